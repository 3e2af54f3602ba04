"""`diptych rollout-server`: a vLLM rollout engine served over HTTP for a trainer in another process.

It loads a Hugging Face folder (``config.json`` + safetensors; no tokenizer needed: prompts arrive
as token ids), starts a colocated vLLM engine on it and serves ``/generate``, ``/weights``
(safetensors bytes, no pickle), ``/health`` and ``/shutdown`` (see ``diptych.rollout.server``).
A trainer with ``rollout: vllm`` and ``vllm: {mode: server}`` starts one on loopback by itself;
run it by hand to put the engine on other GPUs and point ``vllm.url`` at it.

    diptych rollout-server --model runs/grpo/reference --port 8011 --kv-cache-memory-bytes 1073741824
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "serve a vLLM rollout engine over HTTP (generate, weight sync, version check)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="Hugging Face folder: config.json + safetensors")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback; no authentication)")
    p.add_argument("--port", type=int, default=8011, help="0 takes a free port (see --port-file)")
    p.add_argument("--port-file", type=Path, default=None, help="write the server's URL here once it listens")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None, help="KV-cache budget (default 64 MiB)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of the GPU vLLM may take, when no --kv-cache-memory-bytes")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion (default: context)")
    p.add_argument("--logprobs", choices=["processed", "raw"], default="processed",
                   help="log-prob basis: processed = log_softmax(logits / T) (no top-k/p, min-p filter); raw otherwise")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--version", type=int, default=0, help="weight version of --model (the trainer's step)")
    p.add_argument("--max-lora-rank", type=int, default=0,
                   help="serve LoRA adapters up to this rank on the shared base (POST /adapters); 0: none")


def run(args: argparse.Namespace) -> int:
    from diptych.core.hf import load_hf_folder
    from diptych.rollout.base import RolloutEngineError, VLLMConfig
    from diptych.rollout.vllm_engine import VLLMEngine

    try:
        spec, weights = load_hf_folder(args.model)
        kw = {} if args.kv_cache_memory_bytes is None else {"kv_cache_memory_bytes": args.kv_cache_memory_bytes}
        if args.gpu_memory_utilization is not None and args.kv_cache_memory_bytes is None:
            kw = {"kv_cache_memory_bytes": None, "gpu_memory_utilization": args.gpu_memory_utilization}
        cfg = VLLMConfig(mode="colocated", logprobs=args.logprobs, dtype=args.dtype, seed=args.seed,
                         max_model_len=args.max_model_len, **kw)
        lora = None
        if args.max_lora_rank:
            from diptych.core.lora import LoRAConfig

            lora = LoRAConfig(r=args.max_lora_rank, alpha=float(args.max_lora_rank))  # only its rank matters here
        engine = VLLMEngine(spec, weights, config=cfg, version=args.version, lora=lora)
    except (RolloutEngineError, FileNotFoundError, ValueError) as e:
        print(f"diptych rollout-server: {e}", file=sys.stderr)
        return 2
    from diptych.rollout.server import serve

    serve(engine, args.host, args.port, args.port_file, log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="diptych rollout-server", description=HELP)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
