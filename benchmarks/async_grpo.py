"""Asynchronous vs synchronous GRPO on the quickstart task: wall-clock for N steps and reward at equal samples.

Every contender runs ``diptych train grpo --config configs/grpo.yaml`` (the quickstart: arithmetic, char
tokenizer, a tiny Llama) for ``--steps`` steps from the same seed weights, so each has drawn the same number of
samples (steps x prompts_per_step x num_generations) when it stops:

- ``sync``: generate, score, train in turn (the trainer's process, one thread);
- ``async-k1`` / ``async-k2``: ``grpo.async.enabled=true grpo.async.max_staleness=K``, the generator in its own
  process pinned to core 0 (``async.placement=process async.generator_cores=0``), the trainer pinned to core 1.

Reported per contender and seed: ``wall_s`` (the whole run, start-up included), ``reward_last`` (the mean reward
of the last quarter of the steps: reward at equal sample counts), staleness and groups dropped. The issue's
target is at least 1.6x less wall-clock at equal final reward (within noise across 3 seeds). The shared
discipline applies (``benchmarks/discipline.py``): one thread per role, contenders alternating round by round,
the median round, refusal on a loaded machine.

    python benchmarks/async_grpo.py --seeds 0 1 2 --json benchmarks/results/async_grpo.json
    python benchmarks/async_grpo.py --tiny --steps 4 --seeds 0 --rounds 1 --allow-noisy   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import discipline  # noqa: E402 (after the sys.path line)

THREADS = discipline.pin_threads_early()  # before numpy, torch and jax load

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1", "data.n_train=64",
        "data.n_test=8", "grpo.prompts_per_step=4", "grpo.num_generations=4"]


def contender(args: argparse.Namespace, name: str, seed: int) -> Any:
    """One run of the quickstart config under ``name``'s settings; returns its figures."""
    from diptych.cli import main

    flags = [f"grpo.steps={args.steps}", f"grpo.seed={seed}", "checkpoint.every=0", *(TINY if args.tiny else [])]
    cores = sorted(os.sched_getaffinity(0))
    gen_core, train_core = cores[0], cores[-1]
    if name != "sync":
        k = int(name.removeprefix("async-k"))
        flags += ["grpo.async.enabled=true", f"grpo.async.max_staleness={k}", "grpo.async.placement=process",
                  f"grpo.async.generator_cores={gen_core}", f"grpo.async.correction={args.correction}"]

    def run() -> dict[str, Any]:
        before = os.sched_getaffinity(0)
        with tempfile.TemporaryDirectory(prefix="diptych-async-bench-") as tmp:
            if name != "sync" and len(cores) > 1:
                os.sched_setaffinity(0, {train_core})  # the trainer's core; the generator pins itself to its own
            try:
                t0 = time.perf_counter()
                code = main(["train", "grpo", "--backend", args.backend, "--quiet", "--config",
                             str(ROOT / "configs" / "grpo.yaml"), f"out={tmp}/run", *flags])
                wall = time.perf_counter() - t0
            finally:
                os.sched_setaffinity(0, before)
            if code != 0:
                return {"error": f"diptych train exited {code}"}
            rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        tail = rows[-max(1, len(rows) // 4):]
        out = {"wall_s": wall, "reward_last": statistics.fmean(r["reward"] for r in tail),
               "reward_curve": [r["reward"] for r in rows]}
        if name != "sync":
            out.update(staleness_mean=statistics.fmean(r["async/staleness_mean"] for r in rows),
                       groups_dropped=sum(r["async/groups_dropped"] for r in rows),
                       generator_tokens_per_s=statistics.fmean(r["async/generator_tokens_per_s"] for r in rows),
                       trainer_tokens_per_s=statistics.fmean(r["async/trainer_tokens_per_s"] for r in rows))
        return out

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    discipline.add_arguments(p, rounds=1)
    p.add_argument("--backend", default="torch", choices=("torch", "jax"))
    p.add_argument("--steps", type=int, default=60, help="GRPO steps per run (the quickstart's 60)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--staleness", type=int, nargs="+", default=[1, 2])
    p.add_argument("--correction", default="none", choices=("none", "tis", "decoupled"))
    p.add_argument("--tiny", action="store_true", help="a smoke-sized model and batch (not for the README)")
    args = p.parse_args(argv)
    names = ["sync", *(f"async-k{k}" for k in args.staleness)]
    bench = discipline.Bench("async_grpo", args, config={"steps": args.steps, "seeds": args.seeds,
                                                         "backend": args.backend, "tiny": args.tiny,
                                                         "correction": args.correction, "contenders": names})
    results: dict[str, Any] = {}
    for seed in args.seeds:
        results[f"seed{seed}"] = bench.run({n: contender(args, n, seed) for n in names}, "wall_s", tag=f"seed{seed}")
    table = [f"{'contender':<10} {'wall_s (median over seeds)':>27} {'speedup':>8} {'reward_last':>12}"]
    walls = {n: statistics.median(results[f"seed{s}"][n]["wall_s"] for s in args.seeds) for n in names}
    for n in names:
        reward = statistics.fmean(results[f"seed{s}"][n].get("reward_last", float("nan")) for s in args.seeds)
        table.append(f"{n:<10} {walls[n]:>27.2f} {walls['sync'] / walls[n]:>7.2f}x {reward:>12.3f}")
    results["summary"] = {n: {"wall_s_median": walls[n], "speedup_vs_sync": walls["sync"] / walls[n]} for n in names}
    return bench.finish(results, table, args.json)


if __name__ == "__main__":
    sys.exit(main())  # a loaded machine without --allow-noisy: discipline.Refused exits NOISY_EXIT with the reason
