"""Pieces every training loop shares: turning text and rollouts into fixed-shape batches,
evaluating a policy on a task, and timing the phases of a step.

Batches have a FIXED width per run (``max_prompt_len + max_new_tokens``) so the JAX
backend compiles each step once; prompts are left-padded into that width, completions
follow them, and the per-token ``mask`` marks completion targets only.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from diptych.core.sampling import Rollout, SamplingConfig


class TrainerError(ValueError):
    """A trainer setting or dataset that cannot work, with what to change."""


class DivergenceError(RuntimeError):
    """The run diverged: ``max_consecutive_skips`` steps in a row had a non-finite loss or gradient.

    A runtime failure, not bad input (the CLI exits 1, not 2). ``state`` is the train state at the stop: the
    skipped steps left it as the last finite update made it, so it can be inspected or saved elsewhere.
    """

    def __init__(self, message: str, step: int = 0, state: Any = None) -> None:
        super().__init__(message)
        self.step, self.state = step, state


def check_loop_fields(cfg: Any) -> None:
    """Refuse loop settings that cannot run (shared by every trainer config's ``__post_init__``).

    Each message starts with the field name, so ``from_dict`` can name the full key (``grpo.temperature``).
    """
    if cfg.steps < 1:
        raise TrainerError(f"steps must be >= 1, got {cfg.steps}.")
    for name in ("max_prompt_length", "max_completion_length"):
        value = getattr(cfg, name, None)
        if value is not None and value < 1:
            raise TrainerError(f"{name} must be >= 1, got {value}: every sequence needs at least one token.")
    temperature = getattr(cfg, "temperature", None)
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise TrainerError(f"temperature must be a finite number > 0, got {temperature}: it divides the logits of "
                           "both sampling and the train step's log-probs (greedy sampling cannot train).")
    if cfg.max_consecutive_skips < 1:
        raise TrainerError(f"max_consecutive_skips must be >= 1, got {cfg.max_consecutive_skips}.")


def divergence_reason(metrics: Mapping[str, Any]) -> str | None:
    """Why a step was skipped as divergent (a non-finite loss or gradient norm), or None.

    A step skipped for another reason (GRPO's filter dropped every group) has no loss and is not divergence.
    """
    if not metrics.get("skipped"):
        return None
    if isinstance(metrics.get("skip_reason"), str):
        return metrics["skip_reason"]
    bad = [f"{k} {float(metrics[k])}" for k in ("loss", "grad_norm")
           if k in metrics and not math.isfinite(float(metrics[k]))]
    return "non-finite " + " and ".join(bad) if bad else None


@dataclass
class DivergenceGuard:
    """The one divergence policy of every loop, on every backend.

    The backend's train step already skips a non-finite update (weights and optimizer state untouched); the
    guard says so for EVERY skipped step (one line on stderr: the trainer step and the reason) and stops the
    run with :class:`DivergenceError` after ``max_consecutive_skips`` skips in a row: a model that keeps
    producing NaN will not recover, and a run that ends "done" on NaN weights hides it.
    """

    max_consecutive_skips: int = 3
    consecutive: int = 0
    skipped: int = 0

    def check(self, step: int, metrics: Mapping[str, Any], state: Any = None) -> None:
        reason = divergence_reason(metrics)
        if reason is None:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped += 1
        print(f"warning: step {step} skipped ({reason}); weights and optimizer state unchanged "
              f"[{self.consecutive} in a row, the run stops at {self.max_consecutive_skips}]", file=sys.stderr)
        if self.consecutive >= self.max_consecutive_skips:
            raise DivergenceError(
                f"the run diverged: {self.consecutive} steps in a row (through step {step}) had a non-finite loss or "
                f"gradient ({reason}). Lower the learning rate (optim.lr) or clip harder (a smaller "
                "optim.max_grad_norm), then resume from the last checkpoint (--resume) or start over.",
                step=step, state=state)


def finite_on_mask(mask: np.ndarray, *arrays: np.ndarray) -> bool:
    """Whether every array is finite where ``mask`` is set (host arrays: old log-probs, values)."""
    on = np.asarray(mask) > 0
    return all(bool(np.all(np.isfinite(np.asarray(a)[on]))) for a in arrays)


def diverged(metrics: dict[str, Any], what: str, timer: StepTimer | None = None) -> dict[str, Any]:
    """Mark a step skipped before its update because the policy's own forward pass (``what``: old log-probs,
    values) is not finite: the model has diverged, the same verdict on every backend (an eager backend would
    otherwise refuse the NaN as bad loss input, a traced one would reach a NaN loss)."""
    metrics.update(skipped=1.0, loss=float("nan"), skip_reason=f"non-finite {what} from the policy's forward pass",
                   **(timer.metrics() if timer is not None else {}))
    return metrics


def loop_guard(guard: DivergenceGuard | None, cfg: Any) -> DivergenceGuard:
    """The caller's guard (a trainer keeps one across segments), else a fresh one from the config."""
    return guard if guard is not None else DivergenceGuard(cfg.max_consecutive_skips)


@dataclass
class StepTimer:
    """Wall-clock seconds per phase (generate / score / train) of the current step."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_prompt_len: int) -> list[list[int]]:
    """Token ids of each prompt; a prompt longer than ``max_prompt_len`` is an error, not a silent cut."""
    out = []
    for p in prompts:
        ids = list(tokenizer.encode(p))
        if not ids:
            raise TrainerError(f"Prompt {p!r} encodes to no tokens.")
        if len(ids) > max_prompt_len:
            raise TrainerError(
                f"Prompt of {len(ids)} tokens exceeds max_prompt_len={max_prompt_len}: {p[:60]!r}...; "
                "raise max_prompt_len or shorten the prompts."
            )
        out.append(ids)
    return out


def validate_rows(rows: Sequence[Mapping[str, Any]], tokenizer: Any, max_prompt_length: int,
                  text_columns: Sequence[str] = ("prompt",), section: str = "") -> None:
    """Check every row before the first step: the text columns exist and are strings, and every prompt encodes
    to 1..``max_prompt_length`` tokens. A bad row found mid-run (when its batch is drawn) wastes the steps
    before it; found here it costs one pass of the tokenizer."""
    key = f"{section}.max_prompt_length" if section else "max_prompt_length"
    too_long: list[tuple[int, int]] = []
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise TrainerError(f"train_dataset row {i} is a {type(r).__name__}, not a dict of columns.")
        for c in text_columns:
            if c not in r:
                raise TrainerError(f"train_dataset row {i} has no column {c!r} (it has {', '.join(sorted(r))}); "
                                   f"this trainer needs {', '.join(text_columns)}.")
            if c in ("prompt", "completion") and not isinstance(r[c], str):
                raise TrainerError(f"train_dataset row {i} column {c!r} must be a string, got {type(r[c]).__name__}"
                                   " (render chat messages with the tokenizer's chat template first).")
        n = len(tokenizer.encode(r["prompt"]))
        if n == 0:
            raise TrainerError(f"train_dataset row {i}: the prompt {r['prompt']!r} encodes to no tokens.")
        if n > max_prompt_length:
            too_long.append((i, n))
    if too_long:
        i, n = too_long[0]
        more = f" ({len(too_long) - 1} more rows too)" if len(too_long) > 1 else ""
        longest = max(m for _, m in too_long)
        raise TrainerError(f"train_dataset row {i}: the prompt is {n} tokens, over {key}={max_prompt_length}"
                           f"{more}: {str(rows[i]['prompt'])[:60]!r}. Raise {key} to {longest} or shorten or drop "
                           "those rows.")


def pack_sequences(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], width: int,
                   pad_id: int, padding_side: Literal["left", "right"] = "left") -> dict[str, np.ndarray]:
    """Pad ``prompt + completion`` rows to ``width``: tokens, attention_mask and the target mask.

    ``mask[:, t]`` scores target ``tokens[:, t + 1]`` and is 1 exactly on completion tokens. Left
    padding (the default) puts every completion at the end, where generation leaves it; right
    padding starts every row at position 0.
    """
    if padding_side not in ("left", "right"):
        raise TrainerError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    if len(prompts) != len(completions):
        raise TrainerError(f"pack_sequences got {len(prompts)} prompts but {len(completions)} completions.")
    n = len(prompts)
    tokens = np.full((n, width), pad_id, np.int32)
    attn = np.zeros((n, width), np.int32)
    mask = np.zeros((n, width - 1), np.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        row = list(p) + list(c)
        if len(row) > width:
            raise TrainerError(f"Sequence of {len(row)} tokens does not fit the batch width {width}.")
        start = width - len(row) if padding_side == "left" else 0
        tokens[i, start:start + len(row)] = row
        attn[i, start:start + len(row)] = 1
        mask[i, start + len(p) - 1: start + len(row) - 1] = 1.0
    return {"tokens": tokens, "attention_mask": attn, "mask": mask}


def rollout_batch(rollout: Rollout, max_prompt_len: int) -> dict[str, np.ndarray]:
    """Rollout -> fixed-width policy-loss arrays: tokens, attention_mask, mask, sampler log-probs.

    The sampler may return a narrower (bucketed) prompt block; it is widened on the left
    with padding to ``max_prompt_len`` so every step has the same shape.
    """
    pt, pm = rollout.prompt_tokens, rollout.prompt_mask
    p = pt.shape[1]
    if p > max_prompt_len:
        # Bucketing may add left padding beyond max_prompt_len; it must be padding only.
        extra = p - max_prompt_len
        if pm[:, :extra].any():
            raise TrainerError(f"Rollout prompts are longer than max_prompt_len={max_prompt_len}.")
        pt, pm = pt[:, extra:], pm[:, extra:]
    elif p < max_prompt_len:
        pad = max_prompt_len - p
        pad_id = int(pt[pm == 0][0]) if (pm == 0).any() else 0
        pt = np.concatenate([np.full((pt.shape[0], pad), pad_id, pt.dtype), pt], axis=1)
        pm = np.concatenate([np.zeros((pm.shape[0], pad), pm.dtype), pm], axis=1)
    cm = rollout.completion_mask.astype(np.int32)
    tokens = np.concatenate([pt, rollout.completion_tokens], axis=1).astype(np.int32)
    attn = np.concatenate([pm, cm], axis=1).astype(np.int32)
    n, width = tokens.shape
    mask = np.zeros((n, width - 1), np.float32)
    mask[:, max_prompt_len - 1:] = cm
    sampler_lp = np.zeros((n, width - 1), np.float32)
    sampler_lp[:, max_prompt_len - 1:] = np.where(cm > 0, rollout.logprobs, 0.0)
    return {"tokens": tokens, "attention_mask": attn, "mask": mask, "sampler_logprobs": sampler_lp}


def sequence_logprobs(backend: Any, model: Any, tokens: np.ndarray, attention_mask: np.ndarray, mask: np.ndarray,
                      temperature: float = 1.0) -> np.ndarray:
    """Per-token log-probs ``[B, T-1]`` of ``tokens[:, 1:]`` under ``model``, zero off ``mask`` (old, reference
    and cached log-probs all come through here, on the same basis as the train step's)."""
    out = backend.logprobs(model, backend.from_numpy(tokens[:, :-1]), backend.from_numpy(attention_mask[:, :-1]),
                           backend.from_numpy(tokens[:, 1:]), temperature)
    return np.asarray(backend.to_numpy(out), np.float32) * mask


def decode_completions(tokenizer: Any, rollout: Rollout) -> list[str]:
    return [tokenizer.decode(ids) for ids in rollout.completions()]


def evaluate(backend: Any, model: Any, tokenizer: Any, task: Any, rows: Sequence[dict[str, Any]],
             max_prompt_len: int, max_new_tokens: int, batch_size: int = 64) -> dict[str, float]:
    """Greedy accuracy of ``model`` on ``rows`` under the task's own verifier."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, n=1,
                              eos_ids=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)
    scores: list[float] = []
    lengths: list[int] = []
    for i in range(0, len(rows), batch_size):
        chunk = list(rows[i:i + batch_size])
        prompts = [r["prompt"] for r in chunk]
        ids = encode_prompts(tokenizer, prompts, max_prompt_len)
        roll = backend.generate(model, ids, sampling)
        completions = decode_completions(tokenizer, roll)
        columns = columns_of(chunk, exclude=("prompt",))
        scores += [float(s or 0.0) for s in task.reward(prompts, completions, **columns)]
        lengths += [int(x) for x in roll.lengths]
    return {"accuracy": float(np.mean(scores)) if scores else 0.0,
            "completion_length": float(np.mean(lengths)) if lengths else 0.0}


def columns_of(rows: Sequence[dict[str, Any]], exclude: Sequence[str] = (), repeat: int = 1) -> dict[str, list[Any]]:
    """Row dicts -> column lists (each value repeated ``repeat`` times, for G samples per prompt)."""
    keys = [k for k in rows[0] if k not in exclude] if rows else []
    return {k: [r[k] for r in rows for _ in range(repeat)] for k in keys}


def batch_iterator(rows: Sequence[dict[str, Any]], batch_size: int, seed: int, start: int = 0
                   ) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Endless shuffled batches; position ``k`` is reproducible from (seed, k) so resume is exact."""
    if not rows:
        raise TrainerError("The training dataset is empty.")
    n = len(rows)
    k = start
    while True:
        epoch, offset = divmod(k * batch_size, n)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        idx = [order[(offset + j) % n] for j in range(batch_size)]
        yield k, [rows[i] for i in idx]
        k += 1
