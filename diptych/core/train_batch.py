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

Each loss declares its layout where it is registered (``diptych.core.losses.registry``); this module
only reads those declarations. The built-in layouts (required keys; optional keys in brackets):

- ``sft``: ``tokens``, ``attention_mask``, ``mask``.
- ``policy`` (GRPO family, PPO actor): ``tokens``, ``attention_mask``, ``mask``,
  ``advantages`` ([B] or [B, T-1]), [``old_logprobs``, ``ref_logprobs``, ``sampler_logprobs``].
  Without ``old_logprobs`` the step uses the detached current log-probs (one iteration per batch:
  same loss and gradient, one forward fewer).
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

from diptych.core.losses.registry import DETACHED, LOSS_SPECS, BatchLayout, loss_spec, merge_layouts

INT_KEYS = frozenset({"tokens", "attention_mask", "chosen_tokens", "chosen_attention_mask",
                      "rejected_tokens", "rejected_attention_mask"})
"""The built-in layouts' model inputs; a step uses :func:`int_keys` of its own terms."""


class BatchError(ValueError):
    """A micro-batch that does not fit the layout of its loss, with what to fix."""


def loss_terms(loss: str | Mapping[str, float]) -> dict[str, float]:
    """Normalise ``"policy"`` or ``{"policy": 1.0, "value": 0.1}`` to ``{term: weight}`` of registered losses."""
    if isinstance(loss, str):
        terms = {loss: 1.0}
    elif isinstance(loss, Mapping):
        terms = {str(k): float(v) for k, v in loss.items()}
    else:
        raise BatchError(f"loss must be a name like 'policy' or a mapping {{name: weight}}, got {type(loss).__name__}.")
    if not terms:
        raise BatchError("loss mapping is empty; give at least one term, e.g. {'policy': 1.0}.")
    for name in terms:
        if name not in LOSS_SPECS:
            raise BatchError(f"Unknown loss {name!r}; registered losses: {', '.join(sorted(LOSS_SPECS))} "
                             "(add one with diptych.core.losses.register_loss).")
    return terms


def layout(terms: Iterable[str]) -> BatchLayout:
    """The micro-batch layout of these loss terms (the union of their registered layouts)."""
    return merge_layouts(loss_spec(t).layout for t in terms)


def int_keys(terms: Iterable[str]) -> frozenset[str]:
    """The integer model inputs of these terms' layouts: fed to the model, never to the loss."""
    return frozenset(layout(terms).int_keys)


def needed_outputs(terms: Iterable[str], configs: Mapping[str, Any],
                   batch_keys: Iterable[str] | None = None) -> frozenset[str]:
    """The model outputs the backend must compute: what each term declares under its config (with the source of
    each ``detached_<output>``), plus the source of every detached default whose key ``batch_keys`` lacks
    (``logprobs`` for an omitted ``old_logprobs``)."""
    terms = list(terms)
    out = set()
    for t in terms:
        out |= loss_spec(t).outputs(configs.get(t))
    if batch_keys is not None:
        present = set(batch_keys)
        out |= {src for key, src in layout(terms).detached_defaults.items() if key not in present}
    out |= {n[len(DETACHED):] for n in out if n.startswith(DETACHED)}
    return frozenset(out)


def model_quantities_needed(terms: Iterable[str], configs: Mapping[str, Any]) -> tuple[bool, bool, bool]:
    """``(logprobs, entropy, values)`` on ``tokens`` for these terms (see :func:`needed_outputs`)."""
    out = needed_outputs(terms, configs)
    return "logprobs" in out, "entropy" in out, "values" in out


def validate_microbatch(batch: Mapping[str, np.ndarray], terms: Iterable[str]) -> None:
    """Raise :class:`BatchError` naming the missing key or the bad shape, from the terms' registered layouts."""
    terms = list(terms)
    for term in terms:
        lay = loss_spec(term).layout
        missing = [k for k in lay.required if k not in batch]
        if missing:
            raise BatchError(
                f"Micro-batch for loss {term!r} lacks {', '.join(missing)}; it needs {', '.join(lay.required)}"
                + (f" (optional: {', '.join(lay.optional)})" if lay.optional else "") + "."
            )
    lay = layout(terms)
    token_arrays = set(lay.per_token.values()) | set(lay.per_row_or_token.values())
    for tok in sorted(token_arrays):
        if tok not in batch:
            continue
        t = np.shape(batch[tok])
        if len(t) != 2 or t[1] < 2:
            raise BatchError(f"{tok} must be [batch, time] with time >= 2, got shape {t}.")
        am = tok.replace("tokens", "attention_mask")
        if am != tok and am in batch and np.shape(batch[am]) != t:
            raise BatchError(f"{am} has shape {np.shape(batch[am])} but {tok} has {t}; they must match.")
    for key, tok in lay.per_token.items():
        if key in batch and tok in batch:
            want = (np.shape(batch[tok])[0], np.shape(batch[tok])[1] - 1)
            if tuple(np.shape(batch[key])) != want:
                raise BatchError(
                    f"{key} has shape {tuple(np.shape(batch[key]))}; expected {want} = [batch, time - 1] of {tok} "
                    f"(position t scores target {tok}[:, t + 1])."
                )
    for key, tok in lay.per_row_or_token.items():
        if key in batch and tok in batch:
            b, t = np.shape(batch[tok])
            got = tuple(np.shape(batch[key]))
            if got not in ((b,), (b, t - 1)):
                raise BatchError(f"{key} has shape {got}; expected ({b},) or ({b}, {t - 1}).")


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
