"""Pretrain a tiny recurrent-depth model from scratch and show test-time scaling.

Task: ``word_problem`` (multiply 2-24 permutations of three items, answer the product's digit),
with every prefix's product supervised. The product depends on the order of the factors, so the
model folds them in one after another and longer lists need more iterations. (The first version
used ``running_sum``, a commutative sum that attention counts in a couple of iterations: accuracy
plateaued at r = 4-8. ``--task running_sum`` still runs it.) The model (prelude 1, core block 2,
coda 1, width 64) trains with Huginn's recipe scaled down: depth r drawn per step from the
log-normal Poisson schedule with mean 8, backprop through the last k = 4 iterations, random
initial state, AdamW at a constant 2e-3 (``--warmup`` and ``--lr-schedule`` add a warmup and a
decay; which seeds learn depends on both, see the README). A baseline with the same parameters
trains at a fixed r = 1 (a plain 4-layer transformer). Then held-out accuracy is measured at
r = 1 ... 32, adaptively, and per length.

    python -m diptych.recipes.recurrent_pretrain --out runs/recurrent_recipe

Writes ``results.json``, ``sweep.png`` and the trained checkpoint (a Huginn-format folder
plus ``diptych_codec.json`` so ``diptych depth-sweep`` can read the task's prompts).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diptych.core.backend import backend_names
from diptych.core.hf import save_hf_folder
from diptych.core.optim import OptimConfig, lr_at
from diptych.core.recurrent_spec import RecurrentSpec, initial_state_noise, tiny_recurrent_spec
from diptych.core.tasks import get_task
from diptych.recurrent.schedule import DepthSchedule
from diptych.recurrent.sweep import depth_sweep, plot_by_length, plot_sweep, score

CODEC_FILE = "diptych_codec.json"


class CharCodec:
    """Characters to ids; id 0 is padding. Stored next to the checkpoint."""

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.index = {c: i + 1 for i, c in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        bad = sorted({c for c in text if c not in self.index})
        if bad:
            raise ValueError(f"characters {bad} are not in the codec alphabet {self.chars!r}.")
        return [self.index[c] for c in text]

    def batch(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ``(tokens, mask)``."""
        ids = [self.encode(p) for p in prompts]
        width = max(map(len, ids))
        tokens = np.zeros((len(ids), width), np.int32)
        mask = np.zeros((len(ids), width), np.int32)
        for i, row in enumerate(ids):
            tokens[i, width - len(row):], mask[i, width - len(row):] = row, 1
        return tokens, mask

    def save(self, folder: Path, task: str, knobs: dict[str, Any]) -> None:
        (folder / CODEC_FILE).write_text(json.dumps({"chars": self.chars, "task": task, "knobs": knobs}) + "\n")

    @classmethod
    def load(cls, folder: Path) -> tuple[CharCodec, dict[str, Any]]:
        path = Path(folder) / CODEC_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {CODEC_FILE}; depth sweeps need the character codec the "
                                    "recipe wrote (train with `python -m diptych.recipes.recurrent_pretrain`).")
        meta = json.loads(path.read_text())
        return cls(meta["chars"]), meta


@dataclass
class RecipeConfig:
    task: str = "word_problem"
    backend: str = "torch"
    steps: int = 1500
    batch: int = 64
    # Learning rate (core.optim.lr_at): optional linear warmup, then constant or linear/cosine decay
    # to min_lr_ratio * lr. Neither the constant 2e-3 nor warmup 100 + cosine from 3e-3 trains all
    # three seeds past the loss plateau in 1500 steps; per-seed results are in the README.
    lr: float = 2e-3  # peak learning rate (after warmup)
    lr_schedule: str = "constant"  # "constant", "linear" or "cosine" decay after warmup
    warmup: int = 0  # linear warmup steps from lr / warmup to lr
    min_lr_ratio: float = 0.0  # decay floor, as a fraction of lr
    clip: float = 1.0  # global gradient-norm clip
    weight_decay: float = 0.0  # AdamW's decoupled decay (times the learning rate, as in torch and optax)
    # Length curriculum: the longest training list grows linearly from length_start to length[1]
    # over the first length_ramp steps (0: off, every step draws from the whole range).
    length_ramp: int = 0
    length_start: int = 8
    mean_recurrence: int = 8
    backprop_depth: int = 4
    length: tuple[int, int] = (2, 24)
    long_length: tuple[int, int] = (25, 32)  # held-out lists longer than any seen in training
    eval_size: int = 512
    eval_depths: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    seed: int = 0
    baseline: bool = True
    dense: bool = True
    sigma: float = 0.5  # spread of the log-normal depth schedule; larger reaches deeper r more often
    width: int = 64  # n_embd; the MLP is 2x wide
    core_layers: int = 2  # layers in the recurrent block (the work one iteration can do)
    threads: int = 1  # torch intra-op threads: the matmuls are tiny, more threads only add overhead
    out: str = "runs/recurrent_recipe"


# Per task: the codec alphabet, the fixed knobs, and the answer values (single characters).
TASKS: dict[str, dict[str, Any]] = {
    "running_sum": {"chars": "sum =0123456789", "knobs": {"modulo": 10}, "answers": "0123456789"},
    "word_problem": {"chars": "mul =0123456789", "knobs": {}, "answers": "012345"},
    "perm_chain": {"chars": "0123456789:,=ABCDEFGHIJKLMNOPQRSTUVWXY", "knobs": {"size": 5}, "answers": "01234"},
}


def _task(cfg: RecipeConfig, length: tuple[int, int] | None = None):
    if cfg.task not in TASKS:
        raise ValueError(f"recipe task must be one of {sorted(TASKS)}, got {cfg.task!r}.")
    return get_task(cfg.task, length=tuple(length or cfg.length), **TASKS[cfg.task]["knobs"])


def _dense_labels(row: dict[str, Any]) -> list[tuple[int, str]]:
    """(prompt index, label) pairs: every intermediate result where the prompt has computed it.

    running_sum / word_problem: each digit after the space is labelled with the sum (mod 10) /
    product so far; perm_chain: each table's closing ``,`` (and the final ``=``) with the value
    after that hop.
    """
    prompt = row["prompt"]
    if "digits" in row or "factors" in row:
        values = row["trace"] if "factors" in row else np.cumsum(row["digits"]) % 10
        first = prompt.index(" ") + 1
        return [(first + i, str(int(v))) for i, v in enumerate(values)]
    if "trace" in row:
        ends = [i for i, c in enumerate(prompt) if c in ",="]
        return [(i, str(v)) for i, v in zip(ends, row["trace"])]
    raise ValueError("dense supervision needs rows from running_sum ('digits'), word_problem ('factors') or "
                     "perm_chain ('trace').")


def _encode(codec: CharCodec, rows: list[dict[str, Any]], dense: bool = False):
    """Left-padded prompts; the "=" position's target is the answer.

    ``dense`` also supervises every intermediate result (:func:`_dense_labels`): the same rule as
    the answer applied to every prefix, which gives short prefixes as a built-in curriculum.
    """
    tokens, mask = codec.batch([r["prompt"] for r in rows])
    answers = np.array([codec.index[str(r["answer"])] for r in rows])
    targets = np.zeros_like(tokens)
    targets[:, -1] = answers
    weights = np.zeros(tokens.shape, np.float32)
    weights[:, -1] = 1.0
    if dense:
        width = tokens.shape[1]
        for i, r in enumerate(rows):
            shift = width - len(r["prompt"])
            for pos, label in _dense_labels(r):
                targets[i, shift + pos], weights[i, shift + pos] = codec.index[label], 1.0
    return tokens, mask, targets, weights, answers


def optim_config(cfg: RecipeConfig) -> OptimConfig:
    """The recipe's learning-rate schedule as core's :class:`OptimConfig` (one schedule for both backends)."""
    return OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup, total_steps=cfg.steps, schedule=cfg.lr_schedule,
                       min_lr_ratio=cfg.min_lr_ratio, max_grad_norm=cfg.clip)


def lr_table(cfg: RecipeConfig) -> np.ndarray:
    """``lr_at(step)`` for every training step, computed once in plain Python."""
    ocfg = optim_config(cfg)
    return np.array([lr_at(step, ocfg) for step in range(cfg.steps)], np.float32)


def make_trainer(cfg: RecipeConfig, rb: Any, model: Any) -> tuple[Any, Any]:
    """The backend's truncated-backprop trainer driven by :func:`lr_table`.

    Returns ``(trainer, set_lr)``; call ``set_lr(step)`` before each ``trainer.step``. Torch takes
    the step's number through the optimizer's param groups; JAX compiles its step once, so optax
    reads the same table by its update count (a schedule callable), and ``set_lr`` is a no-op.
    """
    table = lr_table(cfg)
    if cfg.backend == "jax":
        import jax.numpy as jnp  # lazy: only the JAX backend needs it

        lrs = jnp.asarray(table)
        trainer = rb.TruncatedTrainer(model, lr=lambda count: lrs[jnp.minimum(count, len(table) - 1)],
                                      clip=cfg.clip, weight_decay=cfg.weight_decay)
        return trainer, lambda step: None
    trainer = rb.TruncatedTrainer(model, lr=float(table[0]), clip=cfg.clip, weight_decay=cfg.weight_decay)

    def set_lr(step: int) -> None:
        for group in trainer.opt.param_groups:
            group["lr"] = float(table[min(step, len(table) - 1)])

    return trainer, set_lr


def curriculum_length(cfg: RecipeConfig, step: int) -> tuple[int, int]:
    """The training lengths at ``step`` under the length curriculum.

    Short lists first, to test whether the long lists' labels (past what an untrained model can
    fold) swamp the gradient of the short ones and prolong the loss plateau; on the evidence in the
    README they do not decide it, so the curriculum is off by default.
    """
    lo, hi = cfg.length
    start = min(max(cfg.length_start, lo), hi)
    if cfg.length_ramp <= 0 or step >= cfg.length_ramp:
        return lo, hi
    return lo, start + int(np.ceil((hi - start) * step / cfg.length_ramp))


def train_model(cfg: RecipeConfig, spec: RecurrentSpec, schedule: DepthSchedule, codec: CharCodec, log=print):
    """Train from the numpy init with the given depth schedule; returns the backend model."""
    rb = importlib.import_module(f"diptych.backends.{cfg.backend}.recurrent")
    model = rb.build(spec, spec.init_weights(cfg.seed))
    trainer, set_lr = make_trainer(cfg, rb, model)
    ocfg = optim_config(cfg)
    task = _task(cfg)
    rows = task.generate("train", cfg.steps * cfg.batch, seed=cfg.seed) if cfg.length_ramp == 0 else []
    state_rng = np.random.default_rng(cfg.seed + 1)
    t0, losses = time.perf_counter(), []
    for step in range(cfg.steps):
        if cfg.length_ramp:
            batch_rows = _task(cfg, curriculum_length(cfg, step)).generate("train", cfg.batch,
                                                                          seed=cfg.seed * 1_000_003 + step)
        else:
            batch_rows = rows[step * cfg.batch: (step + 1) * cfg.batch]
        tokens, mask, targets, weights, _ = _encode(codec, batch_rows, dense=cfg.dense)
        draw = schedule.sample(step)
        s0 = initial_state_noise(spec, (*tokens.shape, spec.n_embd), state_rng)
        set_lr(step)
        losses.append(trainer.step(tokens, mask, targets, weights, num_steps=draw.num_steps,
                                   num_grad_steps=draw.n_grad, init_state=s0))
        if step % 100 == 0 or step == cfg.steps - 1:
            log(f"step {step:5d}  r={draw.num_steps:3d}  lr {lr_at(step, ocfg):.2e}  "
                f"loss {np.mean(losses[-100:]):.3f}  {time.perf_counter() - t0:.0f}s")
    return model, rb, losses


def accuracy_by_length(ops: Any, codec: CharCodec, rows: list[dict[str, Any]], answer_ids: list[int],
                       depths: tuple[int, ...], seed: int) -> dict[str, dict[str, float]]:
    """Held-out accuracy per problem length at each fixed depth: where extra iterations pay off.

    A serial task should show the longer problems needing more depth; a flat profile means the
    model found a shortcut that does not scale with depth.
    """
    out: dict[str, dict[str, float]] = {str(r): {} for r in depths}
    for n in sorted({row["length"] for row in rows}):
        group = [row for row in rows if row["length"] == n]
        tokens, mask, _, _, answers = _encode(codec, group)
        for r in depths:
            res = score(ops, tokens, mask, answers, answer_ids, num_steps=r, state_seed=seed)
            out[str(r)][str(n)] = res["accuracy"]
    return out


def _set_threads(cfg: RecipeConfig) -> None:
    if cfg.backend == "torch" and cfg.threads > 0:
        import torch  # lazy: only the torch backend needs it

        torch.set_num_threads(cfg.threads)


def run(cfg: RecipeConfig, log=print) -> dict[str, Any]:
    if not cfg.clip > 0:
        raise ValueError(f"clip must be > 0 (the global gradient-norm bound), got {cfg.clip}.")
    if cfg.lr_schedule != "constant" and cfg.warmup >= cfg.steps:
        raise ValueError(f"--warmup ({cfg.warmup}) must be below --steps ({cfg.steps}) for the {cfg.lr_schedule} "
                         "decay that follows it; pass a smaller --warmup or --lr-schedule constant.")
    if cfg.weight_decay < 0 or cfg.length_ramp < 0:
        raise ValueError(f"--weight-decay ({cfg.weight_decay}) and --length-ramp ({cfg.length_ramp}) must be >= 0.")
    optim_config(cfg)  # any other bad schedule setting fails here, before any training
    _set_threads(cfg)
    task = _task(cfg)
    codec = CharCodec(TASKS[cfg.task]["chars"])
    longest = max(len(r["prompt"]) for r in _task(cfg, cfg.long_length).generate("test", 64, seed=0))
    spec = tiny_recurrent_spec(vocab_size=codec.vocab_size, mean_recurrence=cfg.mean_recurrence,
                               mean_backprop_depth=cfg.backprop_depth, block_size=max(64, 2 * longest),
                               n_embd=cfg.width,
                               intermediate_size=2 * cfg.width, n_layers_in_recurrent_block=cfg.core_layers)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    test = task.generate("test", cfg.eval_size, seed=cfg.seed + 7)
    tokens, mask, _, _, answers = _encode(codec, test)
    answer_ids = [codec.index[c] for c in TASKS[cfg.task]["answers"]]
    results: dict[str, Any] = {"config": asdict(cfg), "params": spec.num_params()}

    log(f"recurrent model: {spec.num_params()} parameters, mean r {cfg.mean_recurrence}, k {cfg.backprop_depth}")
    sched = DepthSchedule(cfg.mean_recurrence, cfg.backprop_depth, sigma=cfg.sigma, seed=cfg.seed)
    t0 = time.perf_counter()
    model, rb, losses = train_model(cfg, spec, sched, codec, log)
    results["train_seconds"] = time.perf_counter() - t0
    results["final_loss"] = float(np.mean(losses[-50:]))
    ckpt = out / "checkpoint"
    save_hf_folder(ckpt, spec, rb.export(model))
    codec.save(ckpt, cfg.task, {"length": list(cfg.length), **TASKS[cfg.task]["knobs"]})
    ops = rb._Ops(model)
    long_rows = _task(cfg, cfg.long_length).generate("test", cfg.eval_size, seed=cfg.seed + 8)
    ltokens, lmask, _, _, lanswers = _encode(codec, long_rows)
    for key, (tk, mk, ans) in {"sweep": (tokens, mask, answers), "sweep_long": (ltokens, lmask, lanswers)}.items():
        results[key] = depth_sweep(ops, tk, mk, ans, answer_ids, cfg.eval_depths, criteria=("kl", "latent-diff"),
                                   state_seed=cfg.seed)
        for row in results[key]:
            log(f"{key:>10s} {row['mode']:>20s} r={row['num_steps']:3d}  acc {row['accuracy']:.3f}  "
                f"depth {row['mean_depth']:.1f}")
    results["by_length"] = accuracy_by_length(ops, codec, test + long_rows, answer_ids, cfg.eval_depths, cfg.seed)
    for r, accs in results["by_length"].items():
        log(f"by length r={r:>3}: " + " ".join(f"{n}:{a:.2f}" for n, a in accs.items()))

    if cfg.baseline:
        log("baseline: same parameters, fixed r = 1")
        base_sched = DepthSchedule(1, 1, mode="fixed")
        bmodel, _, blosses = train_model(cfg, spec, base_sched, codec, log)
        bops = rb._Ops(bmodel)
        acc = [depth_sweep(bops, tk, mk, ans, answer_ids, (1,), criteria=(), state_seed=cfg.seed)[0]["accuracy"]
               for tk, mk, ans in ((tokens, mask, answers), (ltokens, lmask, lanswers))]
        results["baseline"] = {"accuracy": acc[0], "accuracy_long": acc[1], "final_loss": float(np.mean(blosses[-50:]))}
        log(f"baseline acc {acc[0]:.3f} (long lists {acc[1]:.3f})")
    for key in ("sweep", "sweep_long"):
        fixed = {r["num_steps"]: r["accuracy"] for r in results[key] if r["mode"] == "fixed"}
        if all(d in fixed for d in (4, 8, 16, 32)):
            results[f"test_time_scaling_{key}"] = bool(min(fixed[16], fixed[32]) > max(fixed[4], fixed[8]))
    (lo, hi), (llo, lhi) = cfg.length, cfg.long_length
    unit = {"running_sum": "digits", "word_problem": "factors"}.get(cfg.task, "hops")
    plot_sweep(results["sweep"], out / "sweep.png", title=f"{cfg.task} ({lo}-{hi} {unit}): accuracy vs depth")
    plot_sweep(results["sweep_long"], out / "sweep_long.png",
               title=f"{cfg.task} ({llo}-{lhi} {unit}): accuracy vs depth")
    plot_by_length(results["by_length"], out / "by_length.png", train_max=hi,
                   title=f"{cfg.task}: held-out accuracy by {unit} at each depth")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4, got {text!r}") from None


def _pair(text: str) -> tuple[int, int]:
    lo_hi = _ints(text)
    if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
        raise argparse.ArgumentTypeError(f"expected two digit counts LO,HI with 1 <= LO <= HI, got {text!r}")
    return lo_hi  # type: ignore[return-value]


def parse_config(argv: list[str] | None = None) -> RecipeConfig:
    """The command line as a :class:`RecipeConfig` (defaults from the dataclass)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = RecipeConfig()
    p.add_argument("--task", default=d.task, choices=sorted(TASKS))
    p.add_argument("--backend", default=d.backend, choices=backend_names())
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (after warmup)")
    p.add_argument("--lr-schedule", default=d.lr_schedule, choices=("constant", "linear", "cosine"),
                   help="learning-rate decay after warmup, to --min-lr-ratio * lr at the last step")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear learning-rate warmup steps")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="decay floor as a fraction of lr")
    p.add_argument("--clip", type=float, default=d.clip, help="global gradient-norm clip")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decoupled weight decay")
    p.add_argument("--length-ramp", type=int, default=d.length_ramp,
                   help="length curriculum: steps over which the longest list grows to the --length maximum (0: off)")
    p.add_argument("--length-start", type=int, default=d.length_start,
                   help="length curriculum: the longest list at step 0")
    p.add_argument("--eval-size", type=int, default=d.eval_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--answer-only", action="store_true", help="supervise only the answer, not the running sums")
    p.add_argument("--mean-recurrence", type=int, default=d.mean_recurrence)
    p.add_argument("--backprop-depth", type=int, default=d.backprop_depth)
    p.add_argument("--length", type=_pair, default=d.length, help="training/held-out digit counts, e.g. 4,12")
    p.add_argument("--long-length", type=_pair, default=d.long_length, help="longer held-out lists, e.g. 13,16")
    p.add_argument("--eval-depths", type=_ints, default=d.eval_depths, help="e.g. 1,2,4,8,16,32")
    p.add_argument("--sigma", type=float, default=d.sigma, help="log-normal spread of the depth schedule")
    p.add_argument("--width", type=int, default=d.width, help="model width n_embd (MLP 2x)")
    p.add_argument("--core-layers", type=int, default=d.core_layers, help="layers in the recurrent block")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: leave torch's default)")
    p.add_argument("--out", default=d.out)
    a = p.parse_args(argv)
    return RecipeConfig(task=a.task, backend=a.backend, steps=a.steps, batch=a.batch, lr=a.lr,
                        lr_schedule=a.lr_schedule, warmup=a.warmup, min_lr_ratio=a.min_lr_ratio, clip=a.clip,
                        weight_decay=a.weight_decay, length_ramp=a.length_ramp, length_start=a.length_start,
                        eval_size=a.eval_size, seed=a.seed, baseline=not a.no_baseline, out=a.out,
                        dense=not a.answer_only, mean_recurrence=a.mean_recurrence,
                        backprop_depth=a.backprop_depth, length=a.length, long_length=a.long_length,
                        eval_depths=a.eval_depths, sigma=a.sigma, threads=a.threads, width=a.width,
                        core_layers=a.core_layers)


def main(argv: list[str] | None = None) -> int:
    run(parse_config(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
