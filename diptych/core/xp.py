"""The few array helpers the Array API standard lacks, written once for numpy, jax.numpy and torch.

Losses in ``diptych.core.losses`` ask their inputs for a namespace (``namespace``) and call
only standard functions plus the helpers here, so the same lines run and differentiate on
every backend. Nothing here imports a framework: ``array_api_compat`` recognises an array's
library from the array itself.

Two choices matter for gradients:

* divisions by a count use ``x / maximum(count, 1)`` rather than ``where(count > 0, x / count, 0)``;
  the untaken branch of ``where`` still differentiates to ``0 * inf = nan`` in JAX.
* ``is_concrete`` lets value checks (an empty mask, a NaN) raise a clear error eagerly and
  step aside under ``jax.jit`` / ``jax.grad`` tracing, where data cannot be inspected.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import array_api_compat
import numpy as np

Array = Any  # an Array API array: numpy.ndarray, jax.Array or torch.Tensor


def namespace(*arrays: Array | None) -> Any:
    """The Array API namespace shared by ``arrays`` (``None`` entries ignored)."""
    present = [a for a in arrays if a is not None]
    if not present:
        raise ValueError("namespace() needs at least one array.")
    return array_api_compat.array_namespace(*present)


def is_concrete(x: Array) -> bool:
    """False for a JAX tracer (values unknown until run), True for anything that can be read now."""
    return not any(cls.__name__.endswith("Tracer") for cls in type(x).__mro__)


def as_like(x: Array, like: Array, *, dtype: Any = None) -> Array:
    """``x`` as an array of ``like``'s library and device (numpy inputs next to torch or jax tensors).

    Trainers hold advantages and masks in numpy while the log-probs live on an accelerator; this
    moves the constants over so a loss never fails with "multiple namespaces".
    """
    xp = namespace(like)
    if dtype is None:
        dtype = like.dtype
    if array_api_compat.is_array_api_obj(x) and namespace(x) is xp:
        return x if x.dtype == dtype else xp.astype(x, dtype)
    if array_api_compat.is_array_api_obj(x) and not isinstance(x, np.ndarray):
        raise TypeError(
            f"Cannot mix array libraries: got {type(x).__module__}.{type(x).__name__} next to "
            f"{type(like).__module__}.{type(like).__name__}. Pass numpy arrays or arrays of the same library."
        )
    return xp.asarray(np.asarray(x), dtype=dtype, device=array_api_compat.device(like))


def upcast(x: Array) -> Array:
    """``x`` in float32 when it is a narrower float (bf16 / fp16), else unchanged.

    Loss math on log-probs (ratios, log-ratio means, KL) loses too much in bf16: exp(1e-3) is 1 in
    bf16. Casting is differentiable, so gradients still reach the bf16 model.
    """
    xp = namespace(x)
    if xp.isdtype(x.dtype, "real floating") and xp.finfo(x.dtype).bits < 32:
        return xp.astype(x, xp.float32)
    return x


def to_float(x: Array) -> float:
    """A 0-d concrete array as a Python float (for error messages and checks)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return float(np.asarray(x))


def logsumexp(x: Array, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Array:
    """log(sum(exp(x))) with the max subtracted first, so large inputs do not overflow.

    The shift is an exact identity, so the gradient is softmax(x) whatever the shift is.
    Rows that are all ``-inf`` give ``-inf`` (not nan).
    """
    xp = namespace(x)
    m = xp.max(x, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    out = xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True)) + m
    if not keepdims:
        out = xp.squeeze(out, axis=axis if axis is not None else tuple(range(x.ndim)))
    return out


def log_softmax(x: Array, axis: int = -1) -> Array:
    """x - logsumexp(x): log-probabilities from logits, stable for any scale."""
    return x - logsumexp(x, axis=axis, keepdims=True)


def log_sigmoid(x: Array) -> Array:
    """log(sigmoid(x)) = -log(1 + exp(-x)), via logaddexp so it is finite for any |x|."""
    xp = namespace(x)
    return -xp.logaddexp(xp.zeros_like(x), -x)


def sigmoid(x: Array) -> Array:
    """1 / (1 + exp(-x)), computed as exp(log_sigmoid(x)) to avoid overflow at large -x."""
    xp = namespace(x)
    return xp.exp(log_sigmoid(x))


def masked_sum(x: Array, mask: Array, axis: int | None = None) -> Array:
    """Sum of ``x`` where ``mask`` is 1 (``mask`` multiplies, so it may be fractional weights)."""
    xp = namespace(x)
    return xp.sum(x * mask, axis=axis)


def safe_divide(num: Array, den: Array) -> Array:
    """num / max(den, 1): a zero count gives 0 (its numerator is then 0 too) and no nan gradient."""
    xp = namespace(num, den)
    return num / xp.maximum(den, xp.ones_like(den))


def masked_mean(x: Array, mask: Array, axis: int | None = None) -> Array:
    """Mean of ``x`` over entries where ``mask`` is 1; an all-zero mask gives 0, never nan."""
    xp = namespace(x)
    return safe_divide(masked_sum(x, mask, axis=axis), xp.sum(mask, axis=axis))


def masked_var(x: Array, mask: Array, axis: int | None = None, ddof: int = 0) -> Array:
    """Variance over masked entries with ``ddof`` degrees of freedom removed (0 = population)."""
    xp = namespace(x)
    mean = masked_mean(x, mask, axis=axis)
    if axis is not None:
        mean = xp.expand_dims(mean, axis=axis)
    count = xp.sum(mask, axis=axis)
    return safe_divide(masked_sum((x - mean) ** 2, mask, axis=axis), count - ddof)


def sum_all(values: Iterable[Array]) -> Array:
    """Sum of a sequence of arrays (micro-batch sums, metric sums) without ``sum()``'s int start."""
    it = iter(values)
    total = next(it)
    for v in it:
        total = total + v
    return total
