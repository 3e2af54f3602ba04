"""Retrofit recurrence into a trained Llama and train it with the recurrence curriculum (issue 21, items 3 and 5).

McLeish et al. (arXiv 2511.07384) turn a pretrained decoder into a recurrent-depth model and train it while the
mean recurrence rises. This recipe does it at CPU scale with no download:

1. a 4-layer Llama (diptych's own decoder) is trained on ``word_problem`` (2-8 factors, every prefix's product
   supervised, as in ``recurrent_pretrain``) and saved as a Hugging Face folder;
2. ``diptych retrofit``'s code (``diptych.commands.retrofit.retrofit_folder``) turns it into a Huginn-format model:
   layer 1 the prelude, layers 2-3 the looped core block, layer 4 the coda, the adapter ``[I, I]``;
3. the retrofitted model trains with truncated backprop while the mean of Huginn's depth schedule rises linearly
   from 1 to ``mean_recurrence`` over the first ``ramp`` of the steps (:class:`RecurrenceCurriculum`);
4. the control is the source Llama trained the same extra steps on the same batches, so a gain is not just
   more training.

Reported: held-out accuracy of the source, of the control, and of the retrofitted model at r = 1, 2, 4, 8, 16
before and after the curriculum, on training lengths and on longer lists; and the r = 1 gap between the
retrofitted and the source logits before training (the sandwich norms make it approximate; see
``diptych.core.retrofit``).

    python -m diptych.recipes.retrofit_curriculum --out runs/retrofit_curriculum     # ~10 min on one core
    python -m diptych.recipes.retrofit_curriculum --out /tmp/retro --tiny            # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diptych.commands.retrofit import retrofit_folder
from diptych.core.hf import load_hf_folder, save_hf_folder
from diptych.core.recurrent_spec import RecurrentSpec
from diptych.core.spec import tiny_spec
from diptych.recipes.recurrent_pretrain import TASKS, CharCodec, RecipeConfig, _encode, _ints, _task
from diptych.recurrent.schedule import DepthDraw, DepthSchedule, ScheduleError
from diptych.recurrent.sweep import score

TASK = "word_problem"


@dataclass(frozen=True)
class RecurrenceCurriculum:
    """Huginn's per-step depth draw with a mean that rises over training (McLeish et al.'s curriculum).

    The mean goes linearly from ``start`` to ``mean_recurrence`` over the first ``ramp_steps`` steps and stays
    there; each step draws r from the log-normal Poisson schedule at that mean (``DepthSchedule``, so
    ``E[r] = mean + 1``) and backpropagates through the last ``backprop_depth`` iterations. A retrofitted model
    starts as a one-iteration network: asking it for 8 iterations at once is a large shift, the ramp is not.
    ``ramp_steps=0`` is the plain schedule (no curriculum).
    """

    mean_recurrence: int = 8
    backprop_depth: int = 4
    ramp_steps: int = 200
    start: float = 1.0
    sigma: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1.0 <= self.start <= self.mean_recurrence:
            raise ScheduleError(f"start must be in 1..mean_recurrence={self.mean_recurrence}, got {self.start}.")
        if self.ramp_steps < 0:
            raise ScheduleError(f"ramp_steps must be >= 0 (0: no curriculum), got {self.ramp_steps}.")
        DepthSchedule(self.mean_recurrence, self.backprop_depth, sigma=self.sigma)  # its checks

    def mean_at(self, step: int) -> float:
        if self.ramp_steps == 0:
            return float(self.mean_recurrence)
        frac = min(1.0, step / self.ramp_steps)
        return self.start + (self.mean_recurrence - self.start) * frac

    def sample(self, step: int) -> DepthDraw:
        mean = self.mean_at(step)
        return DepthSchedule(mean, self.backprop_depth, sigma=self.sigma, seed=self.seed).sample(step)  # type: ignore[arg-type]


@dataclass
class RetrofitRecipeConfig:
    out: str = "runs/retrofit_curriculum"
    seed: int = 0
    length: tuple[int, int] = (2, 8)
    long_length: tuple[int, int] = (9, 12)
    width: int = 64
    heads: int = 4
    prelude: int = 1
    core: int = 2
    coda: int = 1
    source_steps: int = 600
    batch: int = 64
    source_lr: float = 2e-3
    curriculum_steps: int = 400
    lr: float = 1e-3
    mean_recurrence: int = 8
    backprop_depth: int = 4
    ramp: float = 0.5  # fraction of the curriculum steps over which the mean rises (0: none)
    control: bool = True
    eval_size: int = 512
    eval_depths: tuple[int, ...] = (1, 2, 4, 8, 16)
    threads: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.ramp <= 1.0:
            raise ValueError(f"ramp must be a fraction of the curriculum steps in [0, 1], got {self.ramp}.")
        if 1 not in self.eval_depths:
            raise ValueError(f"eval_depths {list(self.eval_depths)} must include 1 (the source's own depth).")

    @property
    def layers(self) -> int:
        return self.prelude + self.core + self.coda


def tiny_config(out: str) -> RetrofitRecipeConfig:
    """A seconds-long run of every code path (tests, smoke checks); its numbers mean nothing."""
    return RetrofitRecipeConfig(out=out, length=(2, 4), long_length=(5, 6), width=32, source_steps=30, batch=16,
                                curriculum_steps=6, mean_recurrence=3, backprop_depth=2, eval_size=32,
                                eval_depths=(1, 2, 3))


def _codec() -> CharCodec:
    return CharCodec(TASKS[TASK]["chars"])


def _tasks(cfg: RetrofitRecipeConfig, length: tuple[int, int] | None = None) -> Any:
    return _task(RecipeConfig(task=TASK, length=cfg.length), length)


def source_spec(cfg: RetrofitRecipeConfig) -> Any:
    """A plain Llama of ``prelude + core + coda`` layers over the recipe codec's vocabulary (no grouped kv heads:
    Huginn's q/k biases need none, and the split keeps every layer)."""
    return tiny_spec("llama", vocab_size=_codec().vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
                     num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, intermediate_size=2 * cfg.width,
                     max_position_embeddings=128)


class _Supervised:
    """AdamW on the recipe's masked NLL over any ``logits(tokens, mask)``: the same update for the source, the
    control and (through ``TruncatedTrainer``) the retrofitted model."""

    def __init__(self, module: Any, logits: Any, lr: float) -> None:
        import torch

        self.module, self.logits = module, logits
        self.opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))

    def step(self, tokens: np.ndarray, mask: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> float:
        import torch

        logits = self.logits(tokens, mask)
        lp = torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(targets, dtype=torch.long)[..., None])[..., 0]
        w = torch.as_tensor(weights, dtype=torch.float32)
        loss = -(lp * w).sum() / w.sum().clamp(min=1.0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.opt.step()
        return float(loss.detach())


def _batches(cfg: RetrofitRecipeConfig, steps: int, seed: int) -> Any:
    codec = _codec()
    rows = _tasks(cfg).generate("train", steps * cfg.batch, seed=seed)
    for step in range(steps):
        yield step, _encode(codec, rows[step * cfg.batch: (step + 1) * cfg.batch], dense=True)[:4]


def train_source(cfg: RetrofitRecipeConfig, module: Any, steps: int, lr: float, seed: int, log: Any = print
                 ) -> list[float]:
    from diptych.backends.torch import model as tm

    trainer = _Supervised(module, lambda t, m: tm.forward(module, t, m), lr)
    losses = []
    for step, (tokens, mask, targets, weights) in _batches(cfg, steps, seed):
        losses.append(trainer.step(tokens, mask, targets, weights))
        if step % 100 == 0 or step == steps - 1:
            log(f"  llama step {step:4d}  loss {np.mean(losses[-100:]):.3f}")
    return losses


def train_curriculum(cfg: RetrofitRecipeConfig, model: Any, curriculum: RecurrenceCurriculum, seed: int,
                     log: Any = print) -> tuple[list[float], list[int]]:
    """Truncated backprop at the curriculum's depth per step, zero initial state (the state under which the
    retrofit reproduces the source at r = 1)."""
    from diptych.backends.torch import recurrent as rb

    trainer = rb.TruncatedTrainer(model, lr=cfg.lr)
    losses, depths = [], []
    for step, (tokens, mask, targets, weights) in _batches(cfg, cfg.curriculum_steps, seed):
        draw = curriculum.sample(step)
        losses.append(trainer.step(tokens, mask, targets, weights, num_steps=draw.num_steps,
                                   num_grad_steps=draw.n_grad))
        depths.append(draw.num_steps)
        if step % 100 == 0 or step == cfg.curriculum_steps - 1:
            log(f"  retrofit step {step:4d}  mean {curriculum.mean_at(step):.1f} r={draw.num_steps:3d}  "
                f"loss {np.mean(losses[-100:]):.3f}")
    return losses, depths


def held_out(cfg: RetrofitRecipeConfig) -> dict[str, tuple[np.ndarray, ...]]:
    codec, out = _codec(), {}
    for name, length, seed in (("train_lengths", cfg.length, 7), ("longer", cfg.long_length, 8)):
        tokens, mask, _, _, answers = _encode(codec, _tasks(cfg, length).generate("test", cfg.eval_size, seed=seed))
        out[name] = (tokens, mask, answers)
    return out


def _answer_ids() -> np.ndarray:
    codec = _codec()
    return np.array([codec.index[c] for c in TASKS[TASK]["answers"]])


def source_accuracy(module: Any, sets: dict[str, tuple[np.ndarray, ...]]) -> dict[str, float]:
    """The Llama's held-out accuracy: argmax over the answer digits at the last position, as ``sweep.score``."""
    import torch

    from diptych.backends.torch import model as tm

    ids, out = _answer_ids(), {}
    with torch.no_grad():
        for name, (tokens, mask, answers) in sets.items():
            logits = tm.forward(module, tokens, mask)[:, -1].numpy()
            out[name] = float((ids[np.argmax(logits[:, ids], -1)] == answers).mean())
    return out


def recurrent_accuracy(cfg: RetrofitRecipeConfig, model: Any, sets: dict[str, tuple[np.ndarray, ...]]
                       ) -> dict[str, dict[str, float]]:
    from diptych.backends.torch import recurrent as rb

    ops = rb._Ops(model)
    return {name: {str(r): score(ops, tokens, mask, answers, _answer_ids(), num_steps=r, init_scale=0.0)["accuracy"]
                   for r in cfg.eval_depths} for name, (tokens, mask, answers) in sets.items()}


def logit_gap(source: Any, retrofitted: Any, tokens: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Retrofitted (r = 1, zero state) against source logits on the real (unpadded) positions: the largest
    absolute difference, the source logits' scale, and the mean KL(source || retrofit) per token."""
    import torch

    from diptych.backends.torch import model as tm
    from diptych.backends.torch import recurrent as rb

    with torch.no_grad():
        a = tm.forward(source, tokens, mask).double()
        b = rb.forward(retrofitted, tokens, mask, num_steps=1).double()
    keep = torch.as_tensor(mask, dtype=torch.bool)
    a, b = a[keep], b[keep]
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (la.exp() * (la - lb)).sum(-1).mean()
    return {"max_abs_logit_diff": float((a - b).abs().max()), "source_logit_scale": float(a.abs().max()),
            "mean_kl_nats": float(kl)}


def run(cfg: RetrofitRecipeConfig, log: Any = print) -> dict[str, Any]:
    """Train the source, retrofit it, train it with the curriculum (and the control); writes ``OUT/results.json``."""
    import torch

    from diptych.backends.torch import model as tm
    from diptych.backends.torch import recurrent as rb

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    sets = held_out(cfg)
    spec = source_spec(cfg)
    torch.manual_seed(cfg.seed)
    source = tm.build(spec, spec.init_weights(cfg.seed))
    log(f"source Llama: {cfg.layers} layers, width {cfg.width}; {cfg.source_steps} steps on {cfg.length} factors")
    t0 = time.perf_counter()
    src_losses = train_source(cfg, source, cfg.source_steps, cfg.source_lr, cfg.seed, log)
    timings = {"source_seconds": time.perf_counter() - t0}
    src_weights = tm.export(source)
    save_hf_folder(out / "source", spec, src_weights)
    path = retrofit_folder(out / "source", out / "retrofitted", cfg.prelude, cfg.core, cfg.coda,
                           mean_recurrence=cfg.mean_recurrence, mean_backprop_depth=cfg.backprop_depth)
    rspec, rweights = load_hf_folder(path)
    assert isinstance(rspec, RecurrentSpec)
    retro = rb.build(rspec, rweights)
    results: dict[str, Any] = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
                               "source_params": spec.num_params(), "retrofit_params": rspec.num_params(),
                               "source_final_loss": float(np.mean(src_losses[-50:]))}
    results["source"] = source_accuracy(source, sets)
    tokens, mask, _ = sets["train_lengths"]
    results["r1_gap_before_training"] = logit_gap(source, retro, tokens, mask)
    results["retrofit_before"] = recurrent_accuracy(cfg, retro, sets)
    log(f"source {results['source']}; retrofit before training {results['retrofit_before']}; "
        f"r=1 gap {results['r1_gap_before_training']}")

    curriculum = RecurrenceCurriculum(cfg.mean_recurrence, cfg.backprop_depth,
                                      ramp_steps=round(cfg.ramp * cfg.curriculum_steps), seed=cfg.seed)
    t0 = time.perf_counter()
    losses, depths = train_curriculum(cfg, retro, curriculum, cfg.seed + 1, log)
    timings["curriculum_seconds"] = time.perf_counter() - t0
    results["retrofit_after"] = recurrent_accuracy(cfg, retro, sets)
    results["curriculum"] = {"final_loss": float(np.mean(losses[-50:])), "mean_depth_drawn": float(np.mean(depths)),
                             "ramp_steps": curriculum.ramp_steps,
                             "mean_at": [curriculum.mean_at(s) for s in range(0, cfg.curriculum_steps,
                                                                              max(1, cfg.curriculum_steps // 8))]}
    log(f"retrofit after the curriculum {results['retrofit_after']}")
    if cfg.control:
        t0 = time.perf_counter()
        closses = train_source(cfg, source, cfg.curriculum_steps, cfg.lr, cfg.seed + 1, log)
        timings["control_seconds"] = time.perf_counter() - t0
        results["control"] = {**source_accuracy(source, sets), "final_loss": float(np.mean(closses[-50:]))}
        log(f"control (source trained the same extra steps) {results['control']}")
    save_hf_folder(out / "retrofitted_trained", rspec, rb.export(retro))
    results["timings"] = timings
    results["wall_seconds"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = RetrofitRecipeConfig()
    p.add_argument("--out", default=d.out)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--source-steps", type=int, default=None)
    p.add_argument("--curriculum-steps", type=int, default=None)
    p.add_argument("--mean-recurrence", type=int, default=None)
    p.add_argument("--ramp", type=float, default=None, help="fraction of the steps the mean rises over (0: none)")
    p.add_argument("--eval-depths", type=_ints, default=None)
    p.add_argument("--no-control", action="store_true", help="skip the source trained the same extra steps")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--json", type=Path, default=None, help="also write the results with command and load here")
    a = p.parse_args(argv)
    cfg = tiny_config(a.out) if a.tiny else RetrofitRecipeConfig(out=a.out)
    over = {k: v for k, v in (("seed", a.seed), ("source_steps", a.source_steps),
                              ("curriculum_steps", a.curriculum_steps), ("mean_recurrence", a.mean_recurrence),
                              ("ramp", a.ramp), ("eval_depths", a.eval_depths)) if v is not None}
    try:
        cfg = dataclasses.replace(cfg, threads=a.threads, control=not a.no_control, **over)
    except (ValueError, ScheduleError) as e:
        p.error(str(e))
    load0 = os.getloadavg()
    res = run(cfg)
    if a.json is not None:
        record = {"command": "python -m diptych.recipes.retrofit_curriculum "
                  + " ".join(sys.argv[1:] if argv is None else argv), "seeds": [cfg.seed],
                  "load_average_start": list(load0), "load_average_end": list(os.getloadavg()), **res}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

