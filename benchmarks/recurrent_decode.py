"""Recurrent-depth decode throughput: the per-iteration KV cache against re-running the sequence.

Same tiny recurrent model (weights from one numpy seed), same left-padded batch, fixed depth
r (default 8), EOS disabled so every row generates ``--max-new-tokens`` (default 64), on each
backend, cached (``generate(..., cache=True)``, the default) and uncached (``cache=False``, the
reference that re-runs prelude + r iterations + coda over the whole sequence per token). Each
configuration is warmed up once (compilation for JAX is excluded) and tokens/s is the median
over alternating rounds (the shared discipline, ``benchmarks/discipline.py``: one thread count for
all, median round, refusal on a loaded machine); the speedup is measured within the same run. Both paths must
produce the same tokens (zero initial state), which the script checks.

    python benchmarks/recurrent_decode.py --json benchmarks/results/recurrent_decode.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import discipline

THREADS = discipline.pin_threads_early()  # before numpy, torch and jax load

import numpy as np  # noqa: E402

from diptych.core.recurrent_spec import tiny_recurrent_spec  # noqa: E402
from diptych.core.sampling import SamplingConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=16, help="longest prompt; rows are 1/2..1 of it (left-padded)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="fixed recurrent depth r")
    p.add_argument("--backends", default="jax,torch")
    discipline.add_arguments(p)
    args = p.parse_args(argv)
    backends = args.backends.split(",")
    spec = tiny_recurrent_spec()
    rng = np.random.default_rng(0)
    lengths = np.linspace(args.prompt_len // 2, args.prompt_len, args.batch).astype(int)
    config = dict(batch=args.batch, prompt_lengths=lengths.tolist(), max_new_tokens=args.max_new_tokens,
                  steps=args.steps, backends=backends,
                  spec=dict(n_embd=spec.n_embd, prelude=spec.n_layers_in_prelude, core=spec.n_layers_in_recurrent_block,
                            coda=spec.n_layers_in_coda, vocab=spec.vocab_size))
    bench = discipline.Bench("recurrent_decode", args, config)
    if "jax" in backends:
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    from diptych.core.backend import get_backend

    weights = spec.init_weights(0)
    prompts = [rng.integers(0, spec.vocab_size, n).tolist() for n in lengths]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0, eos_ids=())
    new_tokens = args.batch * args.max_new_tokens
    contenders, first, tokens = {}, {}, {}
    for name in backends:
        be = get_backend(name)
        model = be.build(spec, weights)
        for cache in (True, False):
            key = f"{name}/cache={'on' if cache else 'off'}"

            def rollout(c=cache, be=be, model=model):
                return be.generate(model, prompts, sampling, num_steps=args.steps, cache=c)

            first[key], roll = discipline.timed(rollout)  # warm-up (compilation for JAX)
            tokens[key] = roll.completion_tokens

            def run(rollout=rollout) -> dict:
                seconds, _ = discipline.timed(rollout)
                return {"seconds": seconds, "tokens_per_s": new_tokens / seconds}

            contenders[key] = run
    res = bench.run(contenders, "tokens_per_s")
    rows, table = [], []
    for key, r in res.items():
        rows.append(dict(contender=key, tokens_per_s=r["tokens_per_s"], seconds=r["seconds"], first_call_s=first[key],
                         rounds_tokens_per_s=[x["tokens_per_s"] for x in r["rounds"]]))
        table.append(f"{key:16s} {r['tokens_per_s']:9.1f} tokens/s  ({r['seconds']:.3f} s per rollout, "
                     f"first call {first[key]:.2f} s)")
    for name in backends:
        on, off = res[f"{name}/cache=on"], res[f"{name}/cache=off"]
        same = bool(np.array_equal(tokens[f"{name}/cache=on"], tokens[f"{name}/cache=off"]))
        speedup = off["seconds"] / on["seconds"]
        rows.append(dict(backend=name, speedup=speedup, same_tokens=same))
        table.append(f"{name:6s} cache speedup {speedup:.2f}x, same tokens: {same}")
    return bench.finish(rows, table, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
