"""Rollout engines: vLLM (colocated) against diptych's native samplers and transformers' ``generate``.

Rollout tokens/s at batch 8 and 64 (rows; EOS disabled so every row runs to the end), same weights,
same left-padded prompts, in one process, under the shared discipline (``benchmarks/discipline.py``:
one thread count for all, alternating rounds, median round, refusal on a loaded machine). Each engine
is warmed up once when it is built (vLLM's start-up is reported separately and excluded). Also the
weight-sync seconds per step: ``VLLMEngine.sync_weights`` of the full canonical weight set (what the
trainer pays after every optimizer step), the same into a loopback rollout server over each weight
channel (``http``: safetensors bytes; ``collective``: a gloo broadcast on CPU, NCCL between GPUs), and
the native engine's rebuild for comparison (``--no-server`` skips the server).

Runs in the vLLM environment (``scripts/vllm_env.sh``). On CPU vLLM is not expected to win at tiny
sizes (Python overhead dominates); speed claims need ``--shape gpu`` on a GPU machine.

    .venv-vllm/bin/python benchmarks/rollout_engines.py --shape tiny --json benchmarks/results/rollout_tiny.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import discipline

THREADS = discipline.pin_threads_early()  # before numpy, torch and jax load

import numpy as np  # noqa: E402

from benchmarks.decode_throughput import contender, diptych_runner, hf_runner, make_prompts  # noqa: E402
from diptych.core.sampling import SamplingConfig  # noqa: E402
from diptych.core.spec import tiny_spec  # noqa: E402

# head_dim >= 32 everywhere: vLLM's CPU attention has no smaller kernel.
SHAPES = {
    "tiny": dict(spec=dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1), prompt_len=16,
                 max_new_tokens=64),
    "compute": dict(spec=dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                              intermediate_size=1536), prompt_len=16, max_new_tokens=128),
    "gpu": dict(spec=dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
                          intermediate_size=2816, vocab_size=32000, max_position_embeddings=1024), prompt_len=32,
                max_new_tokens=512),
}


def vllm_runner(spec, weights, prompts, cfg: SamplingConfig, max_len: int, kv_bytes: int):
    from diptych.rollout import VLLMConfig
    from diptych.rollout.vllm_engine import VLLMEngine

    start, engine = discipline.timed(lambda: VLLMEngine(spec, weights, sampling=cfg, max_model_len=max_len,
                                                        config=VLLMConfig(kv_cache_memory_bytes=kv_bytes)))
    return engine, start, lambda: engine.generate(prompts, cfg, seed=0)


def sync_contenders(engine, spec, weights, backend_name: str, servers: dict | None = None) -> dict:
    """Seconds of one full weight sync: into the running vLLM engine, into a rollout server through each of
    ``servers`` (channel -> client of one server), and a native rebuild from the same arrays."""
    from diptych.core.backend import get_backend

    backend = get_backend(backend_name)

    def sync(eng, shared: bool = False):
        def run() -> dict:
            if shared:  # clients of one server take turns: each first adopts the version the other left
                eng.follow()
            seconds, _ = discipline.timed(lambda: eng.sync_weights(weights, eng.weight_version + 1))
            return {"seconds": seconds}
        return run

    def native_rebuild() -> dict:
        seconds, _ = discipline.timed(lambda: backend.build(spec, weights))
        return {"seconds": seconds}

    out = {"vllm": sync(engine), f"native-{backend_name}": native_rebuild}
    for channel, client in (servers or {}).items():
        out[f"vllm-server-{channel}"] = sync(client, shared=True)
    return out


def start_servers(spec, weights, cfg: SamplingConfig, max_len: int, kv_bytes: int) -> dict:
    """One loopback rollout server and a client per weight channel (the second joins the first's server)."""
    from diptych.rollout import VLLMConfig
    from diptych.rollout.server import ServerEngine

    http = ServerEngine.start(spec, weights, sampling=cfg, max_model_len=max_len,
                              config=VLLMConfig(mode="server", kv_cache_memory_bytes=kv_bytes))
    collective = ServerEngine(http.url, version=http.weight_version, timeout_s=http.timeout_s)
    collective.open_collective()
    return {"http": http, "collective": collective}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=list(SHAPES), help="preset (see SHAPES)")
    p.add_argument("--batches", default="8,64", help="comma list of rows per call (default 8,64)")
    p.add_argument("--prompt-len", type=int, help="longest prompt (default: the preset's)")
    p.add_argument("--max-new-tokens", type=int, help="new tokens per row (default: the preset's)")
    p.add_argument("--engines", default="vllm,torch,jax,transformers")
    p.add_argument("--mode", default="sample", choices=["greedy", "sample"],
                   help="sample: temperature 1, no filter (the RL setting; vLLM's processed log-probs)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=256 << 20)
    p.add_argument("--no-server", action="store_true",
                   help="skip the weight sync into a loopback rollout server (http and collective channels)")
    discipline.add_arguments(p)
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    prompt_len = args.prompt_len or shape["prompt_len"]
    new = args.max_new_tokens or shape["max_new_tokens"]
    batches = [int(b) for b in args.batches.split(",")]
    engines = args.engines.split(",")
    spec = tiny_spec("llama", **{"max_position_embeddings": max(512, prompt_len + new), **shape["spec"]})
    cfg = (SamplingConfig(temperature=0, max_new_tokens=new, eos_ids=()) if args.mode == "greedy"
           else SamplingConfig(temperature=1.0, max_new_tokens=new, eos_ids=()))
    config = dict(shape=args.shape, spec=dict(shape["spec"]), params=spec.num_params(), batches=batches,
                  prompt_len=prompt_len, max_new_tokens=new, engines=engines, mode=args.mode,
                  kv_cache_memory_bytes=args.kv_cache_memory_bytes)
    bench = discipline.Bench("rollout_engines", args, config)
    weights = spec.init_weights(0)
    rows, results, vllm_engine = [], {"decode": [], "sync": None}, None
    with tempfile.TemporaryDirectory() as tmp:
        for batch in batches:
            prompts = make_prompts(batch, prompt_len, spec.vocab_size, seed=batch)
            warm, runs = {}, {}
            for engine in engines:
                if engine == "vllm":
                    if vllm_engine is not None:
                        vllm_engine.close()
                    vllm_engine, start_s, fn = vllm_runner(spec, weights, prompts, cfg, prompt_len + new,
                                                           args.kv_cache_memory_bytes)
                    config[f"vllm_start_s_batch{batch}"] = start_s
                elif engine == "transformers":
                    fn = hf_runner(spec, weights, prompts, cfg, Path(tmp) / f"b{batch}")
                else:
                    fn = diptych_runner(engine, spec, weights, prompts, cfg)
                warm[engine], runs[engine] = contender(fn, batch * new, 0.0)
            res = bench.run(runs, "tokens_per_s", tag=f"batch{batch}")
            base = res.get("transformers", {}).get("tokens_per_s")
            for engine in engines:
                r = res[engine]
                rows.append(dict(batch=batch, engine=engine, tokens_per_s=r["tokens_per_s"], seconds=r["seconds"],
                                 warmup_s=warm[engine], rounds_tokens_per_s=[x["tokens_per_s"] for x in r["rounds"]],
                                 speedup_vs_transformers=None if base is None else r["tokens_per_s"] / base))
        results["decode"] = rows
        if vllm_engine is not None:
            backend = next((e for e in engines if e in ("torch", "jax")), "torch")
            servers = {} if args.no_server else start_servers(spec, weights, cfg, prompt_len + new,
                                                              args.kv_cache_memory_bytes)
            try:
                sync = bench.run(sync_contenders(vllm_engine, spec, weights, backend, servers), "seconds", tag="sync")
            finally:
                for client in reversed(list(servers.values())):  # the collective client first, then the server
                    client.close()
            results["sync"] = {k: {"seconds": v["seconds"], "rounds_s": [x["seconds"] for x in v["rounds"]]}
                               for k, v in sync.items()}
            vllm_engine.close()
    table = [f"{args.shape} llama ({spec.num_params()} params), prompt <= {prompt_len}, {new} new tokens, {args.mode}",
             f"{'batch':>5} {'engine':14} {'tokens/s':>10} {'x HF':>6} {'warm-up s':>10}"]
    for r in rows:
        x = "" if r["speedup_vs_transformers"] is None else f"{r['speedup_vs_transformers']:.2f}"
        table.append(f"{r['batch']:5d} {r['engine']:14} {r['tokens_per_s']:10.0f} {x:>6} {r['warmup_s']:10.2f}")
    if results["sync"]:
        table.append("weight sync per step: " + ", ".join(f"{k} {v['seconds'] * 1e3:.1f} ms"
                                                           for k, v in results["sync"].items()))
    return bench.finish(results, table, args.json)


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
