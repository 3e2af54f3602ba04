"""Run the distributed workers once per session, each in its own processes, and hand their results to tests.

JAX: one process with 8 simulated CPU devices (``XLA_FLAGS`` set before jax is imported). torch: ``torchrun``
with 2 or 4 gloo processes. Each worker also runs the one-device reference, so a test compares two runs
that saw the same numpy batches.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.distributed import cases

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")
    return env


def run_worker(cmd: list[str], timeout: float) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", *args]


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return dict(f)


def weights(results: dict[str, np.ndarray], key: str) -> dict[str, np.ndarray]:
    prefix = f"{key}/w/"
    return {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}


JAX_ITEMS = ([f"{c}@{m}" for c in cases.LOSSES for m in ("one", *cases.MESHES)]
             + ["recurrent@one", "recurrent@fsdp=4", "recurrent@data=2,fsdp=2", "remat@fsdp=4",
                "memory@fsdp=8"])


@pytest.fixture(scope="session")
def jax_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("jax_runs") / "runs.npz"
    run_worker([sys.executable, str(HERE / "jax_worker.py"), str(out), *JAX_ITEMS], timeout=1500)
    return load(out)


@pytest.fixture(scope="session")
def torch_runs(tmp_path_factory: pytest.TempPathFactory):
    """``get(mesh) -> results``: one torchrun job per mesh, started the first time a test asks for it."""
    done: dict[str, dict[str, np.ndarray]] = {}

    def get(mesh: str) -> dict[str, np.ndarray]:
        if mesh not in done:
            names = list(cases.LOSSES) + (["recurrent", "remat"] if mesh == "fsdp=4" else [])
            out = tmp_path_factory.mktemp("torch_runs") / "runs.npz"
            cfg_size = 1
            for part in mesh.split(","):
                cfg_size *= int(part.split("=")[1])
            run_worker(torchrun(cfg_size, str(HERE / "torch_worker.py"), str(out), mesh, ",".join(names)),
                       timeout=900)
            done[mesh] = load(out)
        return done[mesh]

    return get
