"""What a training micro-batch holds for each loss, and how a batch is split into micro-batches.

A micro-batch is a flat ``{name: numpy array}`` dict. It carries the token ids the backend
runs the model on, plus the constants the loss needs (old / reference log-probs,
advantages, masks, returns). The backend adds the quantities that carry gradient
(``logprobs``, ``entropy``, ``values``, ``chosen_logprobs`` ...) and hands the rest to
``diptych.core.losses.get_loss(name)`` unchanged.

Shapes: ``tokens`` / ``attention_mask`` are ``[B, T]`` with LEFT padding. Every per-token
array (``mask``, ``old_logprobs``, ``ref_logprobs``, ``advantages`` when per token,
``old_values``, ``returns``) is ``[B, T - 1]``: position ``t`` scores target
``tokens[:, t + 1]`` given ``tokens[:, : t + 1]``. ``mask`` is 1 on the targets the loss
counts (completion tokens) and 0 on prompt and padding.

Layouts (required keys; optional keys in brackets):

- ``sft``: ``tokens``, ``attention_mask``, ``mask``.
- ``policy`` (GRPO family, PPO actor): ``tokens``, ``attention_mask``, ``mask``,
  ``old_logprobs``, ``advantages`` ([B] or [B, T-1]), [``ref_logprobs``, ``sampler_logprobs``].
- ``value`` (PPO critic; needs ``init_train_state(..., value_head=True)``): ``tokens``,
  ``attention_mask``, ``mask``, ``old_values``, ``returns``.
- ``preference`` (DPO family): ``chosen_tokens``, ``chosen_attention_mask``, ``chosen_mask``,
  ``rejected_tokens``, ``rejected_attention_mask``, ``rejected_mask``,
  [``ref_chosen_logprobs``, ``ref_rejected_logprobs``] (per token, cached once by the trainer).

A composite loss (PPO with a value head on the policy) is the union of its terms' layouts.

Keep ``[B, T]`` fixed across steps (pad rollouts to the sampler's maximum length): JAX
compiles one train step per distinct micro-batch shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

INT_KEYS = frozenset({"tokens", "attention_mask", "chosen_tokens", "chosen_attention_mask",
                      "rejected_tokens", "rejected_attention_mask"})
"""Model inputs: integer arrays the backend feeds to the model, never to the loss."""

REQUIRED: dict[str, tuple[str, ...]] = {
    "sft": ("tokens", "attention_mask", "mask"),
    "policy": ("tokens", "attention_mask", "mask", "old_logprobs", "advantages"),
    "value": ("tokens", "attention_mask", "mask", "old_values", "returns"),
    "preference": ("chosen_tokens", "chosen_attention_mask", "chosen_mask",
                   "rejected_tokens", "rejected_attention_mask", "rejected_mask"),
}
OPTIONAL: dict[str, tuple[str, ...]] = {
    "sft": (),
    "policy": ("ref_logprobs", "sampler_logprobs"),
    "value": (),
    "preference": ("ref_chosen_logprobs", "ref_rejected_logprobs"),
}
# per-token keys and the token array whose [B, T-1] shape they must have
_PER_TOKEN = {
    "mask": "tokens", "old_logprobs": "tokens", "ref_logprobs": "tokens", "sampler_logprobs": "tokens",
    "old_values": "tokens", "returns": "tokens",
    "chosen_mask": "chosen_tokens", "ref_chosen_logprobs": "chosen_tokens",
    "rejected_mask": "rejected_tokens", "ref_rejected_logprobs": "rejected_tokens",
}


class BatchError(ValueError):
    """A micro-batch that does not fit the layout of its loss, with what to fix."""


def loss_terms(loss: str | Mapping[str, float]) -> dict[str, float]:
    """Normalise ``"policy"`` or ``{"policy": 1.0, "value": 0.1}`` to ``{term: weight}``."""
    if isinstance(loss, str):
        terms = {loss: 1.0}
    elif isinstance(loss, Mapping):
        terms = {str(k): float(v) for k, v in loss.items()}
    else:
        raise BatchError(f"loss must be a name like 'policy' or a mapping {{name: weight}}, got {type(loss).__name__}.")
    if not terms:
        raise BatchError("loss mapping is empty; give at least one term, e.g. {'policy': 1.0}.")
    for name in terms:
        if name not in REQUIRED:
            raise BatchError(f"Unknown loss {name!r}; train_step supports {', '.join(sorted(REQUIRED))}.")
    return terms


def model_quantities_needed(terms: Iterable[str], configs: Mapping[str, Any]) -> tuple[bool, bool, bool]:
    """``(logprobs, entropy, values)``: which differentiable inputs the backend must compute for these
    loss terms (preference log-probs are always computed for ``"preference"``). Written once so both
    backends run the model exactly as often."""
    terms = set(terms)
    need_lp = bool({"sft", "policy"} & terms)
    need_entropy = "policy" in terms and float(getattr(configs["policy"], "entropy_coef", 0.0) or 0.0) != 0.0
    return need_lp, need_entropy, "value" in terms


def validate_microbatch(batch: Mapping[str, np.ndarray], terms: Iterable[str]) -> None:
    """Raise :class:`BatchError` naming the missing key or the bad shape."""
    terms = list(terms)
    for term in terms:
        missing = [k for k in REQUIRED[term] if k not in batch]
        if missing:
            raise BatchError(
                f"Micro-batch for loss {term!r} lacks {', '.join(missing)}; it needs {', '.join(REQUIRED[term])}"
                + (f" (optional: {', '.join(OPTIONAL[term])})" if OPTIONAL[term] else "") + "."
            )
    for tok in ("tokens", "chosen_tokens", "rejected_tokens"):
        if tok not in batch:
            continue
        t = np.shape(batch[tok])
        if len(t) != 2 or t[1] < 2:
            raise BatchError(f"{tok} must be [batch, time] with time >= 2, got shape {t}.")
        am = tok.replace("tokens", "attention_mask")
        if am in batch and np.shape(batch[am]) != t:
            raise BatchError(f"{am} has shape {np.shape(batch[am])} but {tok} has {t}; they must match.")
    for key, tok in _PER_TOKEN.items():
        if key in batch and tok in batch:
            want = (np.shape(batch[tok])[0], np.shape(batch[tok])[1] - 1)
            if tuple(np.shape(batch[key])) != want:
                raise BatchError(
                    f"{key} has shape {tuple(np.shape(batch[key]))}; expected {want} = [batch, time - 1] of {tok} "
                    f"(position t scores target {tok}[:, t + 1])."
                )
    if "advantages" in batch and "tokens" in batch:
        b, t = np.shape(batch["tokens"])
        if tuple(np.shape(batch["advantages"])) not in ((b,), (b, t - 1)):
            got = tuple(np.shape(batch["advantages"]))
            raise BatchError(f"advantages has shape {got}; expected ({b},) or ({b}, {t - 1}).")


def batch_size(batch: Mapping[str, np.ndarray]) -> int:
    sizes = {np.shape(v)[0] for v in batch.values() if np.ndim(v) >= 1}
    if len(sizes) != 1:
        shapes = {k: tuple(np.shape(v)) for k, v in batch.items()}
        raise BatchError(f"All arrays in a batch must share the leading (batch) dimension; got {shapes}.")
    return sizes.pop()


def split_microbatches(batch: Mapping[str, np.ndarray], n: int) -> list[dict[str, np.ndarray]]:
    """Split along the batch axis into ``n`` equal micro-batches (order kept).

    Equal sizes keep one compiled shape per step on JAX; since losses return an unreduced
    sum and a denominator, the split never changes the update.
    """
    if n < 1:
        raise BatchError(f"Number of micro-batches must be >= 1, got {n}.")
    b = batch_size(batch)
    if b % n:
        raise BatchError(f"Batch of {b} rows does not split into {n} equal micro-batches; choose n dividing {b}.")
    m = b // n
    return [{k: np.asarray(v)[i * m:(i + 1) * m] for k, v in batch.items()} for i in range(n)]


def reduce_metrics(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Sum per-micro-batch loss metrics and divide each ``name`` by ``name_count`` when present.

    Losses return metrics as sums with a ``_count`` companion (see ``diptych.core.losses``),
    so this gives the mean over the whole batch whatever the split.
    """
    summed: dict[str, float] = {}
    for row in rows:
        for k, v in row.items():
            summed[k] = summed.get(k, 0.0) + float(v)
    out = {}
    for k, v in summed.items():
        if k.endswith("_count"):
            continue
        count = summed.get(k + "_count")
        out[k] = v if count is None else (v / count if count > 0 else 0.0)
    return out
