"""NF4 (QLoRA's 4-bit NormalFloat) base weights for the JAX panel.

One text with ``backends/torch/nf4.py`` and the numpy oracle ``kernels/reference.nf4_quantize``: the
same codes, the same scales, the same float32 rounding. ``NF4Array`` is a pytree (the arrays are
leaves, shape and block size are static), so it can sit in a module's state and pass through
``jit``. ``linear_nf4`` dequantises inside the matmul with a custom VJP that keeps only the 4-bit codes
and dequantises again in the backward pass, each time when the layer's input (or cotangent) is there,
so one layer's dense weight is alive at a time.

XLA on CPU flushes subnormal floats to zero, and bitsandbytes floors an all-zero block's absmax at
the subnormal 1e-38; the zero blocks are therefore handled with selects, not arithmetic, so they
still give the oracle's codes (all 0.0) and its stored floor. One case stays apart: a weight that is
all zeros with a trailing partial block, double-quantised, gets offset 0 here and 1e-38 in the
oracle (the mean of subnormals flushes); its dequantised weight is zero in both.
"""

from __future__ import annotations

import dataclasses
import functools
from math import prod

import jax
import jax.numpy as jnp
import numpy as np

from diptych.kernels.reference import (
    DOUBLE_QUANT_BLOCK,
    NF4_BLOCK_SIZES,
    NF4_CODE,
    NF4Weight,
    dynamic_lut,
    dynamic_map,
)

__all__ = ["NF4Array", "dequantize", "from_reference", "linear_nf4", "nbytes", "quantize", "to_reference"]

_NF4_ZERO = 7  # the code of 0.0, which pads an odd element count
_ABSMAX_FLOOR = np.float32(1e-38)  # bitsandbytes' clamp(min=1e-38)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "absmax", "absmax_scale", "absmax_offset"],
    meta_fields=["shape", "block_size", "double_quant"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class NF4Array:
    """JAX arrays of one NF4 weight, laid out as ``kernels.reference.NF4Weight`` describes."""

    codes: jax.Array
    absmax: jax.Array
    shape: tuple[int, ...]
    block_size: int = 64
    double_quant: bool = False
    absmax_scale: jax.Array | None = None
    absmax_offset: jax.Array | None = None

    def arrays(self) -> dict[str, jax.Array]:
        """The arrays by field name."""
        names = ("codes", "absmax", "absmax_scale", "absmax_offset")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


def _as_float_array(w, block_size: int) -> jax.Array:
    if block_size not in NF4_BLOCK_SIZES:
        raise ValueError(f"NF4 block_size must be one of {NF4_BLOCK_SIZES} (as in bitsandbytes); got {block_size}.")
    a = jnp.asarray(w)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(f"NF4 quantises floating-point weights; got dtype {a.dtype}. Cast the weight to float32.")
    if a.size == 0:
        raise ValueError(f"NF4 cannot quantise an empty weight (shape {tuple(a.shape)}).")
    a = a.astype(jnp.float32)
    bad = int((~jnp.isfinite(a)).sum())
    if bad:
        raise ValueError(f"NF4 cannot quantise a weight with NaN or inf ({bad} of {a.size} values); fix the weights.")
    return a


def _tree_mean(x: jax.Array) -> jax.Array:
    # The oracle's pairwise float32 sum (kernels.reference._absmax_mean), replayed op for op.
    n = x.size
    width = 1 << max(0, (n - 1).bit_length())
    acc = jnp.zeros(width, jnp.float32).at[:n].set(x)
    while acc.size > 1:
        half = acc.size // 2
        acc = acc[:half] + acc[half:]
    return acc[0] / jnp.float32(n)


def _quantize_absmax(absmax: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array]:
    # The oracle's kernels.reference._quantize_absmax (bitsandbytes' CPU lookup-table quantiser), op for op.
    # Run eagerly, never under jit: XLA would fuse ``t * 65535 + 0.5`` into one FMA (a single rounding),
    # which can move a value across a lookup-table step.
    centred = absmax - offset
    n = centred.size
    blocks = -(-n // DOUBLE_QUANT_BLOCK)
    padded = jnp.zeros(blocks * DOUBLE_QUANT_BLOCK, jnp.float32).at[:n].set(centred)
    scale = jnp.abs(padded).reshape(blocks, DOUBLE_QUANT_BLOCK).max(axis=1)
    live = scale > 0
    inv = jnp.where(live, 1.0 / jnp.where(live, scale, 1.0), 0.0)
    normed = centred * jnp.repeat(inv, DOUBLE_QUANT_BLOCK)[:n]
    t = (jnp.clip(normed, -1.0, 1.0) + 1.0) * 0.5
    idx = (t * 65535.0 + 0.5).astype(jnp.int32)
    codes = jnp.where(jnp.repeat(live, DOUBLE_QUANT_BLOCK)[:n], jnp.asarray(dynamic_lut())[idx], 0)
    return codes.astype(jnp.uint8), scale


def quantize(w, block_size: int = 64, double_quant: bool = False) -> NF4Array:
    """NF4-quantise ``w`` (numpy or JAX); equals ``kernels.reference.nf4_quantize`` code for code."""
    codes, absmax = _quantize_4bit(_as_float_array(w, block_size), block_size)
    shape = tuple(np.shape(w))
    if not double_quant:
        return NF4Array(codes, absmax, shape, block_size)
    offset = _tree_mean(absmax)
    qabsmax, scale = _quantize_absmax(absmax, offset)
    return NF4Array(codes, qabsmax, shape, block_size, True, scale, offset)


@functools.partial(jax.jit, static_argnums=(1,))
def _quantize_4bit(a: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    # Multiplies, divides, selects and comparisons only: nothing XLA could fuse into an FMA.
    flat = a.reshape(-1)
    n = flat.size
    blocks, full = -(-n // block_size), n // block_size
    padded = jnp.zeros(blocks * block_size, jnp.float32).at[:n].set(flat).reshape(blocks, block_size)
    absmax = jnp.abs(padded).max(axis=1)
    live = absmax > 0
    # Full blocks multiply by the reciprocal, a trailing partial block divides: bitsandbytes' rounding.
    inv = jnp.where(live, 1.0 / jnp.where(live, absmax, 1.0), 0.0)
    scaled = padded * inv[:, None]
    if full < blocks:
        tail = jnp.where(live[full], padded[full] / jnp.where(live[full], absmax[full], 1.0), 0.0)
        scaled = scaled.at[full].set(tail)
        absmax = absmax.at[full].set(jnp.where(live[full], absmax[full], _ABSMAX_FLOOR))
    scaled = jnp.clip(scaled.reshape(-1)[:n], -1.0, 1.0)
    table = jnp.asarray(NF4_CODE)
    bounds = (table[:-1] + table[1:]) / 2
    idx = jnp.searchsorted(bounds, scaled, side="left").astype(jnp.uint8)
    if n % 2:
        idx = jnp.concatenate([idx, jnp.full((1,), _NF4_ZERO, jnp.uint8)])
    return (idx[0::2] << 4) | idx[1::2], absmax


def block_absmax(q: NF4Array) -> jax.Array:
    """The float32 scale of every block (double quantisation undone: ``code8[a] * scale + offset``)."""
    if not q.double_quant:
        return q.absmax
    per_value = jnp.repeat(q.absmax_scale, DOUBLE_QUANT_BLOCK)[: q.absmax.size]
    # Eagerly this rounds twice, as the oracle and torch do. Inside a jit, XLA may fuse the multiply
    # and the add into one FMA (rounded once): the block scale can then differ by one float32 ulp.
    return jnp.asarray(dynamic_map())[q.absmax.astype(jnp.int32)] * per_value + q.absmax_offset


def dequantize(q: NF4Array) -> jax.Array:
    """The float32 weight of shape ``q.shape``; equals ``kernels.reference.nf4_dequantize``."""
    return _dequantize(q)


def _dequantize(q: NF4Array, zero: jax.Array | None = None) -> jax.Array:
    n = prod(q.shape)
    idx = jnp.stack((q.codes >> 4, q.codes & 0x0F), axis=-1).reshape(-1)[:n].astype(jnp.int32)
    if zero is not None:
        idx = idx + zero
    blocks = -(-n // q.block_size)
    values = jnp.asarray(NF4_CODE)[idx]
    if blocks * q.block_size != n:
        values = jnp.zeros(blocks * q.block_size, jnp.float32).at[:n].set(values)
    out = values.reshape(blocks, q.block_size) * block_absmax(q)[:, None]
    return out.reshape(-1)[:n].reshape(q.shape)


def _zero_after(a: jax.Array) -> jax.Array:
    # The integer 0, computed from ``a``, added to the code indices: XLA can then neither hoist a
    # dequantisation ahead of the layer's input (every layer's dense weight alive at once) nor merge the
    # backward's with the forward's (the dense weight kept from forward to backward, as a dense base
    # would be). Barriers do not do it: XLA on CPU drops them before common-subexpression elimination,
    # and it cannot fold ``0 * a`` (a may be inf). Where ``a`` is not finite, neither is the gradient,
    # and the step is skipped.
    return (0.0 * a.reshape(-1)[0].astype(jnp.float32)).astype(jnp.int32)


@jax.custom_vjp
def _linear(x: jax.Array, q: NF4Array, bias: jax.Array | None) -> jax.Array:
    y = x @ _dequantize(q, _zero_after(x)).astype(x.dtype).T
    return y if bias is None else y + bias


def _linear_fwd(x: jax.Array, q: NF4Array, bias: jax.Array | None):
    return _linear(x, q, bias), (q, bias)


def _linear_bwd(res, g: jax.Array):
    # Only the 4-bit codes were kept: the weight is dequantised again here, for this layer only.
    q, bias = res
    grad_x = g @ _dequantize(q, _zero_after(g)).astype(g.dtype)
    grad_q = jax.tree.map(
        lambda a: jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.floating) else np.zeros(a.shape, jax.dtypes.float0),
        q,
    )
    grad_bias = None if bias is None else g.reshape(-1, g.shape[-1]).sum(axis=0).astype(bias.dtype)
    return grad_x, grad_q, grad_bias


_linear.defvjp(_linear_fwd, _linear_bwd)


def linear_nf4(x: jax.Array, q: NF4Array, bias: jax.Array | None = None) -> jax.Array:
    """``x @ dequantize(q).T + bias`` for a 2-D ``q`` of shape [out, in], in ``x``'s dtype."""
    if len(q.shape) != 2 or x.shape[-1] != q.shape[1]:
        raise ValueError(
            f"linear_nf4 wants x [..., {q.shape[-1]}] and a 2-D weight [out, in]; got x {tuple(x.shape)} "
            f"and weight {q.shape}."
        )
    return _linear(x, q, bias)


def nbytes(q: NF4Array) -> int:
    """Bytes the weight occupies: packed codes, block scales, and the double-quantisation scales."""
    return int(sum(a.size * a.dtype.itemsize for a in q.arrays().values()))


def from_reference(q: NF4Weight) -> NF4Array:
    """The oracle's ``NF4Weight`` as JAX arrays (no requantisation)."""
    def a(x):
        return None if x is None else jnp.asarray(x)

    offset = jnp.float32(q.absmax_offset) if q.double_quant else None
    return NF4Array(a(q.codes), a(q.absmax), tuple(q.shape), q.block_size, q.double_quant, a(q.absmax_scale), offset)


def to_reference(q: NF4Array) -> NF4Weight:
    """The numpy ``NF4Weight`` holding the same codes and scales."""
    def a(x):
        return None if x is None else np.asarray(x)

    offset = float(np.float32(q.absmax_offset)) if q.double_quant else 0.0
    return NF4Weight(a(q.codes), a(q.absmax), tuple(q.shape), q.block_size, q.double_quant, a(q.absmax_scale), offset)
