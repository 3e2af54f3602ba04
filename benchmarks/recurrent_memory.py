"""Peak training memory of a recurrent-depth model: truncated (r, k) vs full backprop.

One gradient step (loss = mean token NLL) on the same model and batch at (r=32, k=8),
(r=8, k=8) and full backprop through r=32, on each backend. Every configuration runs in a
fresh subprocess and reports its peak resident memory above a baseline subprocess that only
builds the model and runs one no-grad forward (so weights, framework and compile caches
cancel out). For JAX the compiled step's own ``memory_analysis()`` temp bytes are reported
too (an allocator-independent view of the same thing).

Targets (issue 7): (32, 8) within 1.3x of (8, 8), and below 40% of full backprop at r = 32.

The shared discipline (``benchmarks/discipline.py``) applies: ``--threads`` for every child
(default 1), configurations alternating round by round (``--rounds``, default 1: peaks are
deterministic), the median round reported, and a loaded machine refused.

    python benchmarks/recurrent_memory.py --json results/recurrent_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import discipline

THREADS = discipline.pin_threads_early()  # before numpy, torch and jax load (children get --threads too)

CONFIGS = {"truncated_r32_k8": (32, 8), "truncated_r8_k8": (8, 8), "full_r32": (32, None), "baseline": (1, 0)}


def _spec(args):
    from diptych.core.recurrent_spec import tiny_recurrent_spec

    return tiny_recurrent_spec(n_embd=args.hidden, n_heads=4, intermediate_size=2 * args.hidden,
                               n_layers_in_prelude=1, n_layers_in_recurrent_block=2, n_layers_in_coda=1)


def _child(args) -> dict:
    """Run one configuration and report peak RSS (and JAX's compiled temp bytes)."""
    import numpy as np

    r, k = CONFIGS[args.config]
    spec = _spec(args)
    w = spec.init_weights(0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, spec.vocab_size, (args.batch, args.seq)).astype(np.int32)
    out: dict = {"config": args.config, "r": r, "k": k}
    if args.backend == "torch":
        import torch

        from diptych.backends.torch import recurrent as R

        torch.set_num_threads(THREADS)
        model = R.build(spec, w)
        if args.config == "baseline":
            with torch.no_grad():
                R.forward(model, tokens, None, num_steps=1)
        else:
            logits = R.forward(model, tokens, None, num_steps=r, num_grad_steps=k)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                     torch.as_tensor(tokens[:, 1:]).long().flatten())
            loss.backward()
    else:
        import jax
        import jax.numpy as jnp

        from diptych.backends.jax import recurrent as R

        model = R.build(spec, w)
        P = model.param_dict()
        tok = jnp.asarray(tokens)
        mask = jnp.ones_like(tok)
        if args.config == "baseline":
            R.forward(model, tok, None, num_steps=1).block_until_ready()
        else:
            n_grad = min(r, k) if k is not None else r

            def loss_fn(P, n_no_grad):
                logits, _ = R.latent_forward_params(P, spec, tok, mask, None, n_no_grad, n_grad, remat=k is not None)
                lp = jax.nn.log_softmax(logits[:, :-1], -1)
                return -jnp.take_along_axis(lp, tok[:, 1:, None], -1).mean()

            step = jax.jit(jax.grad(loss_fn))
            n_no_grad = jnp.asarray(r - n_grad, jnp.int32)
            compiled = step.lower(P, n_no_grad).compile()
            mem = compiled.memory_analysis()
            out["jax_temp_bytes"] = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else None
            jax.tree_util.tree_map(lambda a: a.block_until_ready(), compiled(P, n_no_grad))
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _run_child(args, backend: str, config: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--backend", backend, "--config", config, "--batch", str(args.batch),
           "--seq", str(args.seq), "--hidden", str(args.hidden), "--threads", str(THREADS)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{backend}/{config} child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", action="append", choices=["jax", "torch"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    discipline.add_arguments(p, rounds=1)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    backends = args.backend or ["jax", "torch"]
    bench = discipline.Bench("recurrent_memory", args, {"batch": args.batch, "seq": args.seq, "hidden": args.hidden,
                                                        "backends": backends})
    contenders = {f"{b}/{c}": (lambda b=b, c=c: _run_child(args, b, c)) for b in backends for c in CONFIGS}
    res = bench.run(contenders, "peak_rss_bytes")
    results: dict = {"backends": {}}
    table = []
    mib = 1 << 20
    for backend in backends:
        rows = {c: dict(res[f"{backend}/{c}"]) for c in CONFIGS}
        base = rows["baseline"]["peak_rss_bytes"]
        for row in rows.values():
            row["peak_above_baseline_bytes"] = row["peak_rss_bytes"] - base
        t32, t8, full = (rows[c]["peak_above_baseline_bytes"] for c in ("truncated_r32_k8", "truncated_r8_k8",
                                                                         "full_r32"))
        summary = {"r32k8_over_r8k8": t32 / max(t8, 1), "r32k8_over_full_r32": t32 / max(full, 1)}
        if backend == "jax":
            j32, j8, jf = (rows[c].get("jax_temp_bytes") or 0 for c in ("truncated_r32_k8", "truncated_r8_k8",
                                                                        "full_r32"))
            summary.update(jax_temp_r32k8_over_r8k8=j32 / max(j8, 1), jax_temp_r32k8_over_full_r32=j32 / max(jf, 1))
        summary["meets_target"] = summary["r32k8_over_r8k8"] <= 1.3 and summary["r32k8_over_full_r32"] < 0.4
        results["backends"][backend] = {"rows": rows, "summary": summary}
        table.append(f"[{backend}] peak above baseline: (32,8) {t32 / mib:.1f} MiB, (8,8) {t8 / mib:.1f} MiB, "
                     f"full r=32 {full / mib:.1f} MiB -> ratios {summary['r32k8_over_r8k8']:.2f}x, "
                     f"{summary['r32k8_over_full_r32']:.2f} of full")
        if backend == "jax":
            table.append(f"[jax] compiled temp bytes: (32,8) {j32 / mib:.1f} MiB, (8,8) {j8 / mib:.1f} MiB, "
                         f"full {jf / mib:.1f} MiB")
    return bench.finish(results, table, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
