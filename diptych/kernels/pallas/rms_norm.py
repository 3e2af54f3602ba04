"""Pallas twin of RMSNorm, rounding where Hugging Face rounds so a fused model equals the plain one.

Same algorithm as ``diptych.kernels.triton.rms_norm``: forward ``y = weight * cast(x * rstd, x.dtype)``
with float32 statistics, one program per ``BLOCK_R`` rows holding whole (power-of-two padded)
rows, ``rstd`` kept for the backward; backward ``dx = rstd * (g - xhat * mean(g * xhat))`` with
``g = dy * weight``, plus one partial ``dweight`` row per program summed afterwards (no atomics).
Wrapped in ``jax.custom_vjp`` because autodiff does not pass through ``pallas_call``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from diptych.kernels.pallas.logprobs import _compiler_params, _interpret, _pad_to

__all__ = ["fused_rms_norm"]

F32 = jnp.float32


def _fwd_kernel(x_ref, w_ref, y_ref, rstd_ref, *, H, eps, x_dtype):
    x = x_ref[...].astype(F32)
    rstd = jax.lax.rsqrt(jnp.sum(x * x, axis=1) / H + eps)
    xhat = (x * rstd[:, None]).astype(x_dtype).astype(F32)
    y_ref[...] = (xhat * w_ref[...].astype(F32)[None, :]).astype(y_ref.dtype)
    rstd_ref[...] = rstd


def _bwd_kernel(x_ref, w_ref, dy_ref, rstd_ref, dx_ref, dw_ref, *, H):
    x = x_ref[...].astype(F32)
    dy = dy_ref[...].astype(F32)
    rstd = rstd_ref[...]
    xhat = x * rstd[:, None]
    g = dy * w_ref[...].astype(F32)[None, :]
    dx_ref[...] = rstd[:, None] * (g - xhat * (jnp.sum(g * xhat, axis=1) / H)[:, None])
    dw_ref[...] = jnp.sum(dy * xhat, axis=0)[None, :]


def _shapes(n: int, h: int) -> tuple[int, int]:
    hp = max(16, int(pl.next_power_of_2(h)))
    br = 8 if _interpret() else max(8, min(16, 8192 // hp))
    return br, hp


def _prep(x2, w, br, hp):
    return _pad_to(_pad_to(x2, 0, br), 1, hp), _pad_to(w, 0, hp)


def _run_fwd(x2, w, eps, out_dtype):
    n, h = x2.shape
    br, hp = _shapes(n, h)
    xp, wp = _prep(x2, w, br, hp)
    y, rstd = pl.pallas_call(
        partial(_fwd_kernel, H=h, eps=eps, x_dtype=x2.dtype),
        out_shape=[jax.ShapeDtypeStruct(xp.shape, out_dtype), jax.ShapeDtypeStruct((xp.shape[0],), F32)],
        grid=(xp.shape[0] // br,),
        in_specs=[pl.BlockSpec((br, hp), lambda i: (i, 0)), pl.BlockSpec((hp,), lambda i: (0,))],
        out_specs=[pl.BlockSpec((br, hp), lambda i: (i, 0)), pl.BlockSpec((br,), lambda i: (i,))],
        interpret=_interpret(),
        compiler_params=_compiler_params(),
        name="diptych_rms_norm_fwd",
    )(xp, wp)
    return y[:n, :h], rstd


def _run_bwd(x2, w, rstd, dy2):
    n, h = x2.shape
    br, hp = _shapes(n, h)
    xp, wp = _prep(x2, w, br, hp)
    dyp = _pad_to(_pad_to(dy2, 0, br), 1, hp)
    programs = xp.shape[0] // br
    rows = pl.BlockSpec((br, hp), lambda i: (i, 0))
    dx, dw_partial = pl.pallas_call(
        partial(_bwd_kernel, H=h),
        out_shape=[jax.ShapeDtypeStruct(xp.shape, F32), jax.ShapeDtypeStruct((programs, hp), F32)],
        grid=(programs,),
        in_specs=[rows, pl.BlockSpec((hp,), lambda i: (0,)), rows, pl.BlockSpec((br,), lambda i: (i,))],
        out_specs=[rows, pl.BlockSpec((1, hp), lambda i: (i, 0))],
        interpret=_interpret(),
        compiler_params=_compiler_params(),
        name="diptych_rms_norm_bwd",
    )(xp, wp, dyp, rstd)
    return dx[:n, :h], jnp.sum(dw_partial, axis=0)[:h]


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fused(x, w, eps):
    return _fused_fwd(x, w, eps)[0]


def _fused_fwd(x, w, eps):
    x2 = x.reshape(-1, x.shape[-1])
    y, rstd = _run_fwd(x2, w, eps, jnp.promote_types(x.dtype, w.dtype))
    return y.reshape(x.shape), (x2, w, rstd)


def _fused_bwd(eps, res, dy):
    x2, w, rstd = res
    dx, dw = _run_bwd(x2, w, rstd, dy.reshape(x2.shape))
    return dx.astype(x2.dtype).reshape(dy.shape), dw.astype(w.dtype)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis; differentiable w.r.t. ``x`` and ``weight``; output dtype promote(x, weight)."""
    if tuple(weight.shape) != tuple(x.shape[-1:]):
        raise ValueError(f"weight must have shape ({x.shape[-1]},); got {tuple(weight.shape)}.")
    return _fused(x, weight, float(eps))
