"""Recurrent-depth sampling: the parallel (diffusion-forcing style) sampler against the sequential one.

Same tiny recurrent model (weights from one numpy seed, the state half of the adapter scaled by
``--contraction`` so the recurrence converges as a trained Huginn model's does), same left-padded
batch, EOS disabled so every row generates ``--max-new-tokens``, at batch 1 and ``--batch`` (default
8), on each backend: the sequential sampler at fixed depth ``--steps`` (KV-cached, the default path)
against ``generate(..., sampler="parallel", num_steps=--steps, tol=--tol)``. Each configuration is
warmed up once (JAX compilation excluded); tokens/s is the median over alternating rounds under the
shared discipline (``benchmarks/discipline.py``: one thread count for all, median round, refusal on a
loaded machine); each round times ``--reps`` rollouts after one untimed one and keeps their median. The
script reports whether both produce the same greedy tokens (they must when ``--steps`` is deep enough to
converge) and the parallel sampler's mean exit depth.

    python benchmarks/recurrent_parallel.py --json benchmarks/results/recurrent_parallel.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import discipline

THREADS = discipline.pin_threads_early()  # before numpy, torch and jax load

import numpy as np  # noqa: E402

from diptych.core.recurrent_spec import tiny_recurrent_spec  # noqa: E402
from diptych.core.sampling import SamplingConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="the larger batch (batch 1 is always run too)")
    p.add_argument("--prompt-len", type=int, default=16, help="longest prompt; rows are 1/2..1 of it (left-padded)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=24, help="sequential depth r = the parallel sampler's cap")
    p.add_argument("--tol", type=float, default=1e-5, help="parallel sampler: relative latent change to exit")
    p.add_argument("--contraction", type=float, default=0.3, help="scale of the adapter's state half")
    p.add_argument("--backends", default="jax,torch")
    p.add_argument("--reps", type=int, default=5,
                   help="timed rollouts per contender and round, after one untimed one (median reported)")
    discipline.add_arguments(p)
    args = p.parse_args(argv)
    backends = args.backends.split(",")
    spec = tiny_recurrent_spec()
    rng = np.random.default_rng(0)
    batches = sorted({1, args.batch})
    config = dict(batches=batches, max_new_tokens=args.max_new_tokens, steps=args.steps, tol=args.tol,
                  contraction=args.contraction, backends=backends,
                  spec=dict(n_embd=spec.n_embd, prelude=spec.n_layers_in_prelude, core=spec.n_layers_in_recurrent_block,
                            coda=spec.n_layers_in_coda, vocab=spec.vocab_size))
    bench = discipline.Bench("recurrent_parallel", args, config)
    if "jax" in backends:
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    from diptych.core.backend import get_backend

    weights = spec.init_weights(0)
    weights["transformer.adapter.weight"][:, : spec.n_embd] *= np.float32(args.contraction)
    lengths = np.linspace(args.prompt_len // 2, args.prompt_len, args.batch).astype(int)
    all_prompts = [rng.integers(0, spec.vocab_size, n).tolist() for n in lengths]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0, eos_ids=())
    contenders, first, tokens, depth = {}, {}, {}, {}
    for name in backends:
        be = get_backend(name)
        model = be.build(spec, weights)
        for b in batches:
            prompts = all_prompts[-b:]
            for sampler in ("sequential", "parallel"):
                key = f"{name}/b={b}/{sampler}"
                kw = {"sampler": sampler, "tol": args.tol} if sampler == "parallel" else {}

                def rollout(be=be, model=model, prompts=prompts, kw=kw):
                    return be.generate(model, prompts, sampling, num_steps=args.steps, **kw)

                first[key], roll = discipline.timed(rollout)  # warm-up (compilation for JAX)
                tokens[key], depth[key] = roll.completion_tokens, roll.extras.get("mean_depth")
                new_tokens = b * args.max_new_tokens

                def run(rollout=rollout, n=new_tokens) -> dict:
                    # One untimed rollout first: the contender before this one left the caches cold (a
                    # 0.07 s rollout measured cold varied 2x between rounds), then the median of --reps.
                    rollout()
                    seconds = float(np.median([discipline.timed(rollout)[0] for _ in range(args.reps)]))
                    return {"seconds": seconds, "tokens_per_s": n / seconds}

                contenders[key] = run
    res = bench.run(contenders, "tokens_per_s")
    rows, table = [], []
    for key, r in res.items():
        rows.append(dict(contender=key, tokens_per_s=r["tokens_per_s"], seconds=r["seconds"], first_call_s=first[key],
                         mean_depth=depth[key], rounds_tokens_per_s=[x["tokens_per_s"] for x in r["rounds"]]))
        table.append(f"{key:26s} {r['tokens_per_s']:9.1f} tokens/s  ({r['seconds']:.3f} s per rollout, "
                     f"mean depth {depth[key]:.1f})")
    for name in backends:
        for b in batches:
            seq, par = res[f"{name}/b={b}/sequential"], res[f"{name}/b={b}/parallel"]
            same = bool(np.array_equal(tokens[f"{name}/b={b}/sequential"], tokens[f"{name}/b={b}/parallel"]))
            speedup = seq["seconds"] / par["seconds"]
            per_round = [s_["seconds"] / p_["seconds"] for s_, p_ in zip(seq["rounds"], par["rounds"])]
            rows.append(dict(backend=name, batch=b, speedup=speedup, speedup_by_round=per_round, same_tokens=same))
            table.append(f"{name:6s} batch {b}: parallel speedup {speedup:.2f}x, same tokens: {same}")
    return bench.finish(rows, table, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
