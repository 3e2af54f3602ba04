"""Recurrent-depth decode throughput: the per-iteration KV cache against re-running the sequence.

Same tiny recurrent model (weights from one numpy seed), same left-padded batch, fixed depth
r (default 8), EOS disabled so every row generates ``--max-new-tokens`` (default 64), on each
backend, cached (``generate(..., cache=True)``, the default) and uncached (``cache=False``, the
reference that re-runs prelude + r iterations + coda over the whole sequence per token). Each
configuration is warmed up once (compilation for JAX is excluded) and tokens/s is the median
over ``--repeats`` timed runs; the speedup is measured within the same run. Both paths must
produce the same tokens (zero initial state), which the script checks.

    python benchmarks/recurrent_decode.py --json benchmarks/results/recurrent_decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diptych.core.recurrent_spec import tiny_recurrent_spec
from diptych.core.sampling import SamplingConfig


def _timed(fn, repeats: int) -> tuple[float, float, object]:
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t0)
    return first, statistics.median(runs), out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=16, help="longest prompt; rows are 1/2..1 of it (left-padded)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="fixed recurrent depth r")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", default="jax,torch")
    p.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    if args.torch_threads > 0 and "torch" in args.backends:
        import torch

        torch.set_num_threads(args.torch_threads)
    if "jax" in args.backends:
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    from diptych.core.backend import get_backend

    spec = tiny_recurrent_spec()
    weights = spec.init_weights(0)
    rng = np.random.default_rng(0)
    lengths = np.linspace(args.prompt_len // 2, args.prompt_len, args.batch).astype(int)
    prompts = [rng.integers(0, spec.vocab_size, n).tolist() for n in lengths]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0, eos_ids=())
    new_tokens = args.batch * args.max_new_tokens
    rows = []
    for name in args.backends.split(","):
        be = get_backend(name)
        model = be.build(spec, weights)
        res = {}
        for cache in (True, False):
            def rollout(c=cache, be=be, model=model):
                return be.generate(model, prompts, sampling, num_steps=args.steps, cache=c)

            first, med, roll = _timed(rollout, args.repeats)
            res[cache] = (first, med, roll)
            rows.append(dict(backend=name, cache=cache, tokens_per_s=new_tokens / med, seconds=med,
                             first_call_s=first))
            print(f"{name:6s} cache={'on ' if cache else 'off'} {new_tokens / med:9.1f} tokens/s  "
                  f"({med:.3f} s per rollout, first call {first:.2f} s)")
        same = bool(np.array_equal(res[True][2].completion_tokens, res[False][2].completion_tokens))
        speedup = res[False][1] / res[True][1]
        rows.append(dict(backend=name, speedup=speedup, same_tokens=same))
        print(f"{name:6s} speedup {speedup:.2f}x, same tokens: {same}")
    meta = dict(batch=args.batch, prompt_lengths=lengths.tolist(), max_new_tokens=args.max_new_tokens,
                steps=args.steps, repeats=args.repeats, torch_threads=args.torch_threads,
                spec=dict(n_embd=spec.n_embd, prelude=spec.n_layers_in_prelude, core=spec.n_layers_in_recurrent_block,
                          coda=spec.n_layers_in_coda, vocab=spec.vocab_size),
                cpu=platform.processor() or platform.machine(), cores=os.cpu_count())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, results=rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
