"""What every loss shares: input checks, token aggregation, and the divide-once contract.

A loss returns ``(unreduced_sum, denominator, metrics)``. The trainer sums the first two over
micro-batches (and devices) and divides once, so the result equals the full-batch loss whatever
the split (DESIGN.md rule 3). That works only if the denominator of a micro-batch depends on that
micro-batch alone and adds up: a token count, a sequence count, or a sequence count times a
constant. Every aggregation mode below has that form.

Metrics follow one convention: every metric ``name`` is a *sum* over the micro-batch and comes
with ``name + "_count"``; sum both over micro-batches (``sum_metrics``) and call
``finalize_metrics`` to get means.

Value checks (empty rows, NaN inputs) run only on concrete arrays (numpy, torch, eager jax);
under ``jax.jit`` / ``jax.grad`` tracing they step aside and the math stays NaN-free by
construction (padding positions are zeroed before use, counts are clamped at 1).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np

from diptych.core import xp as X

Array = Any
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


class LossInputError(ValueError):
    """A loss batch that is malformed (missing key, wrong shape, empty mask, NaN), with how to fix it."""


def require(batch: Mapping[str, Array], key: str, why: str = "") -> Array:
    if key not in batch or batch[key] is None:
        have = ", ".join(sorted(k for k, v in batch.items() if v is not None))
        raise LossInputError(f"batch[{key!r}] is required{(' ' + why) if why else ''}; the batch has: {have}.")
    return batch[key]


def check_shape(key: str, x: Array, shape: tuple[int, ...], ref_key: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise LossInputError(
            f"batch[{key!r}] has shape {tuple(x.shape)}, expected {tuple(shape)} (the shape of batch[{ref_key!r}])."
        )


def float_input(batch: Mapping[str, Array], key: str, like: Array) -> Array:
    """A float input from ``batch`` in ``like``'s library, device and dtype."""
    return X.as_like(batch[key], like)


def token_mask(batch: Mapping[str, Array], key: str, like: Array, like_key: str, allow_empty: bool) -> Array:
    """``batch[key]`` as a float 0/1 mask shaped like ``like``; empty rows raise unless allowed."""
    mask = X.as_like(require(batch, key), like)
    check_shape(key, mask, tuple(like.shape), like_key)
    if X.is_concrete(mask):
        m = _to_numpy(mask)
        if not np.all((m == 0) | (m == 1)):
            raise LossInputError(f"batch[{key!r}] must hold only 0 and 1, got values {np.unique(m)[:5]}.")
        empty = np.flatnonzero(m.sum(axis=-1) == 0)
        if empty.size and not allow_empty:
            raise LossInputError(
                f"batch[{key!r}] rows {empty.tolist()[:8]} have no tokens, so their sequences have no loss to "
                "average. Drop those rows, give every sequence at least one token (its EOS), or set "
                "allow_empty_sequences=True to leave them out of the loss and of the denominator."
            )
    return mask


MODEL_OUTPUTS = frozenset({"logprobs", "chosen_logprobs", "rejected_logprobs", "values", "entropy"})
"""Quantities the model computes in the train step. A non-finite one is a diverged model, not bad
input: it must reach the loss as NaN so the train step skips the update (the same on every backend,
since JAX cannot raise while tracing), instead of raising here."""


def masked_input(x: Array, mask: Array, key: str) -> Array:
    """``x`` with padding positions replaced by 0: -inf or NaN log-probs there then cannot leak NaN
    into values or gradients (``x * 0`` would be NaN for ``x = -inf``). Non-finite data inside the
    mask is an input error, except for model outputs (see ``MODEL_OUTPUTS``)."""
    xp = X.namespace(x)
    if key not in MODEL_OUTPUTS and X.is_concrete(x) and X.is_concrete(mask):
        bad = ~np.isfinite(_to_numpy(x)) & (_to_numpy(mask) > 0)
        if bad.any():
            where = np.argwhere(bad)[0].tolist()
            raise LossInputError(f"batch[{key!r}] is not finite at {where} inside the mask; check the producer.")
    return xp.where(mask > 0, x, xp.zeros_like(x))


def sequence_input(batch: Mapping[str, Array], key: str, like: Array, n: int, ref_key: str) -> Array:
    x = X.as_like(require(batch, key), like)
    check_shape(key, x, (n,), ref_key + " rows")
    if X.is_concrete(x) and not np.all(np.isfinite(_to_numpy(x))):
        raise LossInputError(f"batch[{key!r}] contains NaN or inf.")
    return x


def aggregate(
    per_token: Array, mask: Array, mode: str, norm_length: int | float | None = None
) -> tuple[Array, Array]:
    """Reduce a ``[B, T]`` per-token loss to ``(unreduced_sum, denominator)``; see module doc.

    With ``s_b = sum_t L[b,t] m[b,t]``, ``n_b = sum_t m[b,t]`` and ``S`` the number of non-empty rows:

    * ``token_mean``: ``sum_b s_b / sum_b n_b``; every token weighs the same (DAPO, Yu et al. 2025).
    * ``seq_mean_token_mean``: ``sum_b (s_b / n_b) / S``; every sequence weighs the same, so a token of a
      long sequence weighs less (GRPO, Shao et al. 2024: the length bias Dr.GRPO points out).
    * ``seq_mean_token_sum``: ``sum_b s_b / S``; long sequences weigh more.
    * ``seq_mean_token_sum_norm``: ``sum_b s_b / (S * norm_length)`` with a constant ``norm_length``
      (the max completion length): no length bias at any batch composition (Dr.GRPO, Liu et al. 2025).
    """
    xp = X.namespace(per_token)
    token_sums = xp.sum(per_token * mask, axis=-1)
    token_counts = xp.sum(mask, axis=-1)
    n_seqs = xp.sum(xp.astype(token_counts > 0, per_token.dtype))
    if mode == "token_mean":
        return xp.sum(token_sums), xp.sum(token_counts)
    if mode == "seq_mean_token_mean":
        return xp.sum(X.safe_divide(token_sums, token_counts)), n_seqs
    if mode == "seq_mean_token_sum":
        return xp.sum(token_sums), n_seqs
    if mode == "seq_mean_token_sum_norm":
        if norm_length is None or norm_length <= 0:
            raise LossInputError(
                "aggregation 'seq_mean_token_sum_norm' needs a constant norm_length > 0 "
                "(set it to the maximum completion length)."
            )
        return xp.sum(token_sums), n_seqs * float(norm_length)
    raise LossInputError(f"Unknown aggregation {mode!r}; choose one of {', '.join(AGGREGATIONS)}.")


def token_metric(metrics: dict[str, Array], name: str, values: Array, mask: Array) -> None:
    """Record a per-token quantity as (sum over masked tokens, token count)."""
    xp = X.namespace(values)
    metrics[name] = xp.sum(values * mask)
    metrics[name + "_count"] = xp.sum(mask)


def row_metric(metrics: dict[str, Array], name: str, values: Array, weights: Array | None = None) -> None:
    """Record a per-sequence quantity as (sum over rows, row count)."""
    xp = X.namespace(values)
    if weights is None:
        weights = xp.ones_like(values)
    metrics[name] = xp.sum(values * weights)
    metrics[name + "_count"] = xp.sum(weights)


def reduce_loss(unreduced_sum: Array, denominator: Array) -> Array:
    """The single division, after accumulating both terms over micro-batches and devices.

    A zero denominator (no tokens or no sequences in the whole batch) raises when it can be seen;
    under tracing it returns 0 instead of NaN.
    """
    if X.is_concrete(denominator) and X.to_float(denominator) <= 0:
        raise LossInputError(
            "The accumulated loss denominator is 0: the batch had no masked tokens or no sequences. "
            "Check the masks, or skip the step when a filter dropped every group."
        )
    return X.safe_divide(unreduced_sum, denominator)


def sum_metrics(per_micro_batch: Iterable[Mapping[str, Array]]) -> dict[str, Array]:
    """Add metric dicts of several micro-batches key by key (all sums, so addition is exact)."""
    items = list(per_micro_batch)
    if not items:
        return {}
    keys = items[0].keys()
    return {k: X.sum_all(m[k] for m in items) for k in keys}


def finalize_metrics(summed: Mapping[str, Array]) -> dict[str, float]:
    """Divide each ``name`` by ``name_count`` (an empty count gives 0.0) and return plain floats."""
    out = {}
    for k, v in summed.items():
        if k.endswith("_count"):
            continue
        total = X.to_float(v)
        if k + "_count" in summed:
            count = X.to_float(summed[k + "_count"])
            out[k] = total / count if count > 0 else 0.0
        else:
            out[k] = total
    return out


def _to_numpy(x: Array) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x)
