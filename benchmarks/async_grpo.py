"""Asynchronous vs synchronous GRPO on the quickstart task: wall-clock for N steps and reward at equal samples.

Every contender runs ``diptych train grpo --config configs/grpo.yaml`` (the quickstart: arithmetic, char
tokenizer, a tiny Llama) for ``--steps`` steps from the same seed weights, so each has drawn the same number of
samples (steps x prompts_per_step x num_generations) when it stops:

- ``sync``: generate, score, train in turn (the trainer's process, one thread);
- ``async-k1`` / ``async-k2``: ``grpo.async.enabled=true grpo.async.max_staleness=K``, the generator in its own
  process pinned to core 0 (``async.placement=process async.generator_cores=0``), the trainer pinned to core 1.

Reported per contender and seed: ``wall_s`` (the wall-clock of the N training steps: every step, the
generator's start-up, the final checkpoint; ``run_wall_s`` adds the CLI's shared set-up), ``reward_last``
(the mean reward of the last quarter of the steps: reward at equal sample counts), staleness and groups dropped,
and where the time went. The issue's target is at least 1.6x less wall-clock at equal final reward (within
noise across 3 seeds). The shared discipline applies (``benchmarks/discipline.py``): one thread per role, contenders
alternating round by round, the median round, refusal on a loaded machine.

**The ceiling.** With two roles on two cores the best an asynchronous run can do is
``(gen + train) / max(gen, train)``, where ``gen`` and ``train`` are the synchronous run's time in sampling and
in scoring + training (its ``time/*`` metrics): 2x when they are equal, 1.25x when one is four times the other.
The quickstart as shipped (16 prompts x 8, 6 completion tokens, 96 wide) spends most of a step training, so its
ceiling is about 1.25x, below the 1.6x target; training costs grow with the rows of a batch faster than
sampling's (whose cost at this size is mostly per decode step). The default here (``--shape balanced``) is the
quickstart task and config with the model narrowed to 48, 4 prompts x 8 a step and up to 64 completion tokens,
where the two roles take about as long (ceiling about 1.9x; 16 prompts and 32 tokens gave 1.6x). Every run
reports ``phases`` (the sync run's ``generate_s``, ``score_s``, ``train_s`` and the ``ceiling`` they allow; the
async runs' generator busy / idle time, trainer idle time, weight publication, the first step's wait for the
generator) so a figure can be judged against its ceiling. ``--shape quickstart`` is the quickstart as shipped.

**Reward.** From random weights the quickstart's exact-answer verifier pays 0 for hundreds of steps, so every
advantage is 0 and "reward at equal samples" would compare zeros. The balanced shape scores with
``data.reward=partial_credit`` (1 at the right number, falling linearly to 0 half its size away): the reward
climbs from about 0.01 in the first steps, so the runs' ``reward_last`` can be compared.

**Start-up.** The generator process is forked from a fork server that has imported torch or JAX and diptych
(``diptych.asyncrl.placement.prestart``, started as soon as the CLI has read the config), and until it is ready
the trainer's process samples the first jobs on the generator's core (``async/warm_start_jobs``). Contenders run
in one benchmark process, so after the first asynchronous run the server is already up. Two roles gain only if
the machine really runs two processes at once: the run first measures that (``core_parallelism``: two pinned
processes' matmuls against one alone; about 0.5 on a busy machine or on two vCPUs sharing one core, where no
asynchronous speed-up is possible).

    python benchmarks/async_grpo.py --seeds 0 1 2 --json benchmarks/results/async_grpo.json   # about 6 min quiet
    python benchmarks/async_grpo.py --tiny --steps 4 --seeds 0 --rounds 1 --allow-noisy   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import discipline  # noqa: E402 (after the sys.path line)

THREADS = discipline.pin_threads_early()  # before numpy, torch and jax load

SHAPE = ["model.hidden_size=48", "model.intermediate_size=96", "grpo.prompts_per_step=4", "data.reward=partial_credit"]
"""The default shape: the quickstart's 2-layer model narrowed (96 -> 48 wide, 4 heads of 12), 4 prompts x 8 a step
and 64 completion tokens, so that sampling and training take about as long (quiet, one core each, 300 steps:
15.9 s vs 16.9 s, a ceiling of 1.94x; 16 prompts with 32 tokens measured 17.0 s vs 28.5 s, 1.59x; the quickstart
as shipped 0.11 vs 0.45 s a step, 1.25x); the partial-credit reward so that the reward moves from random
weights. ``--shape quickstart`` keeps the shipped model, batch and verifier."""

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1", "data.n_train=64",
        "data.n_test=8", "grpo.prompts_per_step=4", "grpo.num_generations=4"]


def contender(args: argparse.Namespace, name: str, seed: int) -> Any:
    """One run of the quickstart config under ``name``'s settings; returns its figures."""
    from diptych.cli import main

    # later flags win: the shape, then the smoke size, then what the command line asked for
    flags = [*(SHAPE if args.shape == "balanced" else []), *(TINY if args.tiny else []),
             f"grpo.steps={args.steps}", f"grpo.seed={seed}", "checkpoint.every=0",
             f"grpo.max_completion_length={args.completion_length}", "data.n_test=8",
             *([f"grpo.prompts_per_step={args.prompts_per_step}"] if args.prompts_per_step else []), *args.set]
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
                with timed_steps() as steps_s:
                    code = main(["train", "grpo", "--backend", args.backend, "--quiet", "--config",
                                 str(ROOT / "configs" / "grpo.yaml"), f"out={tmp}/run", *flags])
                wall = time.perf_counter() - t0
            finally:
                os.sched_setaffinity(0, before)
            if code != 0:
                return {"error": f"diptych train exited {code}"}
            rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        tail = rows[-max(1, len(rows) // 4):]
        out = {"wall_s": steps_s[0], "run_wall_s": wall, "reward_last": statistics.fmean(r["reward"] for r in tail),
               "reward_curve": [r["reward"] for r in rows], "phases": phases(rows, name == "sync")}
        if name != "sync":
            out.update(staleness_mean=statistics.fmean(r["async/staleness_mean"] for r in rows),
                       groups_dropped=sum(r["async/groups_dropped"] for r in rows),
                       generator_tokens_per_s=statistics.fmean(r["async/generator_tokens_per_s"] for r in rows),
                       trainer_tokens_per_s=statistics.fmean(r["async/trainer_tokens_per_s"] for r in rows))
        return out

    return run


def _spin(core: int, seconds: float, out: Any) -> None:
    """Matmuls on one core for ``seconds``; puts how many it did (the core-parallelism check's worker)."""
    os.sched_setaffinity(0, {core})
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a = torch.tanh(a @ a)
        n += 1
    out.put(n)


def core_parallelism(seconds: float = 2.0) -> dict[str, float]:
    """How much work two pinned processes do together, relative to one alone (1.0: two real cores; about 0.5:
    the two vCPUs share one core, or the machine is busy). The async speed-up cannot exceed
    ``1 + efficiency x min/max`` of the roles' times, whatever the code does, so the figure goes with the result."""
    import multiprocessing as mp

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return {"efficiency": float("nan")}
    ctx = mp.get_context("spawn")

    def run(which: list[int]) -> list[int]:
        q = ctx.Queue()
        procs = [ctx.Process(target=_spin, args=(c, seconds, q)) for c in which]
        for p in procs:
            p.start()
        got = [q.get(timeout=120) for _ in procs]
        for p in procs:
            p.join()
        return got

    alone = run([cores[0]])[0]
    both = run([cores[0], cores[-1]])
    return {"alone_ops": float(alone), "together_ops": float(sum(both)), "efficiency": sum(both) / (2 * alone)}


@contextlib.contextmanager
def timed_steps() -> Iterator[list[float]]:
    """The wall-clock of the training steps alone (``run_segments``: every step, the generator's start-up and the
    final checkpoint; not the CLI's data, model and evaluation set-up, which sync and async share)."""
    from diptych.core.trainers import api

    out: list[float] = [float("nan")]
    inner = api.run_segments

    def run_segments(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            out[0] = time.perf_counter() - t0

    api.run_segments = run_segments
    try:
        yield out
    finally:
        api.run_segments = inner


def phases(rows: list[dict[str, Any]], sync: bool) -> dict[str, float]:
    """Where a run's step time went, summed over its steps (seconds); for sync, the ceiling those times allow."""
    def total(key: str) -> float:
        return float(sum(r.get(key, 0.0) for r in rows))

    if sync:
        gen, score, train = total("time/generate"), total("time/score"), total("time/train")
        return {"generate_s": gen, "score_s": score, "train_s": train,
                "ceiling": (gen + score + train) / max(gen, score + train, 1e-9)}
    return {"generator_busy_s": total("async/generator_busy_s"), "generator_idle_s": total("async/generator_idle_s"),
            "trainer_idle_s": total("async/trainer_idle_s"),
            "first_step_wait_s": float(rows[0].get("async/trainer_idle_s", 0.0)) if rows else 0.0,
            "score_s": total("time/score"), "train_s": total("time/train"), "publish_s": total("time/sync")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    discipline.add_arguments(p, rounds=1)
    p.add_argument("--backend", default="torch", choices=("torch", "jax"))
    p.add_argument("--steps", type=int, default=300,
                   help="GRPO steps per run (enough that the generator start-up is a small part; quickstart: 60)")
    p.add_argument("--completion-length", type=int, default=None,
                   help="grpo.max_completion_length (default: 64 for --shape balanced, the quickstart's 6 for "
                        "--shape quickstart: training-bound, ceiling < 1.6x)")
    p.add_argument("--shape", default="balanced", choices=("balanced", "quickstart"),
                   help="balanced: the quickstart model 48 wide, 4 prompts a step, partial-credit reward (sampling ~ "
                        "training); quickstart: as shipped")
    p.add_argument("--prompts-per-step", type=int, default=None,
                   help="grpo.prompts_per_step (default: 4 for --shape balanced, the quickstart's 16 otherwise)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more config overrides for every contender, e.g. model.path=DIR")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--staleness", type=int, nargs="+", default=[1, 2])
    p.add_argument("--correction", default="none", choices=("none", "tis", "decoupled"))
    p.add_argument("--tiny", action="store_true", help="a smoke-sized model and batch (not for the README)")
    p.add_argument("--skip-core-check", action="store_true", help="skip the two-core parallelism check")
    args = p.parse_args(argv)
    if args.completion_length is None:
        args.completion_length = 64 if args.shape == "balanced" else 6
    names = ["sync", *(f"async-k{k}" for k in args.staleness)]
    cores = {} if args.skip_core_check else core_parallelism()
    bench = discipline.Bench("async_grpo", args, config={"steps": args.steps, "seeds": args.seeds,
                                                         "backend": args.backend, "tiny": args.tiny,
                                                         "completion_length": args.completion_length,
                                                         "prompts_per_step": args.prompts_per_step, "set": args.set,
                                                         "shape": args.shape, "core_parallelism": cores,
                                                         "correction": args.correction, "contenders": names})
    results: dict[str, Any] = {}
    for seed in args.seeds:
        results[f"seed{seed}"] = bench.run({n: contender(args, n, seed) for n in names}, "wall_s", tag=f"seed{seed}")
    table = [f"{'contender':<10} {'wall_s (median over seeds)':>27} {'speedup':>8} {'reward_last':>12}  phases (s, "
             "summed over steps; median seed)"]
    walls = {n: statistics.median(results[f"seed{s}"][n]["wall_s"] for s in args.seeds) for n in names}
    for n in names:
        reward = statistics.fmean(results[f"seed{s}"][n].get("reward_last", float("nan")) for s in args.seeds)
        mid = sorted(args.seeds, key=lambda s: results[f"seed{s}"][n]["wall_s"])[len(args.seeds) // 2]
        ph = results[f"seed{mid}"][n].get("phases", {})
        shown = " ".join(f"{k.removesuffix('_s')}={v:.2f}" for k, v in ph.items())
        table.append(f"{n:<10} {walls[n]:>27.2f} {walls['sync'] / walls[n]:>7.2f}x {reward:>12.3f}  {shown}")
    results["summary"] = {n: {"wall_s_median": walls[n], "speedup_vs_sync": walls["sync"] / walls[n]} for n in names}
    if cores:
        table.append(f"two-core parallelism: {cores['efficiency']:.2f} (two pinned processes together do that fraction "
                     "of twice one alone's work; 1.0 on two free cores)")
    return bench.finish(results, table, args.json)


if __name__ == "__main__":
    sys.exit(main())  # a loaded machine without --allow-noisy: discipline.Refused exits NOISY_EXIT with the reason
