"""Pallas twin of the fused selective log-prob kernel (LM head + log-softmax + gather + entropy).

Same algorithm as ``diptych.kernels.triton.logprobs``, line for line: the forward grids over
blocks of tokens and walks the vocabulary in ``BLOCK_V`` columns (and the hidden size in
``BLOCK_H`` slices) with an online logsumexp, so the ``[N, V]`` logits never exist; it keeps the
per-token ``lse`` and entropy. The backward recomputes logit tiles in two kernels, one gridded over
(tokens, hidden) for ``dh`` and one over (vocab, hidden) for ``dW``. ``jax.custom_vjp`` carries the
gradient, since autodiff does not pass through ``pallas_call``.

Inputs are zero-padded to whole blocks in the wrapper (padded vocabulary columns are masked to
-inf inside), which keeps every in-kernel slice static-sized. Kernels run with ``interpret=True``
when the default device is a CPU; on GPU they lower through Triton (explicit
``plgpu.CompilerParams``, since jax 0.10 defaults to Mosaic GPU). Block sizes are powers of two
>= 16 as the Triton lowering needs. There is no TPU variant: the kernel reads the whole weight
through a full-array block, which fits GPU (pointer) semantics, not VMEM; a TPU version would grid
over vocabulary blocks with (8, 128)-aligned tiles and accumulate in scratch.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["fused_selective_logprobs"]

F32 = jnp.float32


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


def _compiler_params():
    if jax.default_backend() == "gpu":
        from jax.experimental.pallas import triton as plgpu

        return plgpu.CompilerParams(num_warps=4, num_stages=2)
    return None


def _logit_tile(h_ref, w_ref, v0, n_h: int, bv: int, bh: int, inv_temp: jax.Array):
    """``h_block @ w[v0:v0+bv].T * inv_temp`` in float32, summed over ``n_h`` hidden slices."""

    def body(k, acc):
        hb = h_ref[:, pl.ds(k * bh, bh)].astype(F32)
        wb = w_ref[pl.ds(v0, bv), pl.ds(k * bh, bh)].astype(F32)
        return acc + jnp.dot(hb, wb.T, preferred_element_type=F32)

    return jax.lax.fori_loop(0, n_h, body, jnp.zeros((h_ref.shape[0], bv), F32)) * inv_temp


def _dlogits(z, cols_valid, onehot, lse, ent, g_lp, g_ent, inv_temp):
    logp = z - lse[:, None]
    p = jnp.exp(logp)
    dz = g_lp[:, None] * (onehot - p) - g_ent[:, None] * p * (logp + ent[:, None])
    return jnp.where(cols_valid, dz * inv_temp, 0.0)


def _fwd_kernel(h_ref, w_ref, y_ref, inv_ref, logp_ref, ent_ref, lse_ref, *, V, n_v, n_h, bv, bh):
    bn = h_ref.shape[0]
    inv_temp = inv_ref[0]
    y = y_ref[...]

    def body(j, carry):
        m, s, a, zt = carry
        v0 = j * bv
        z = _logit_tile(h_ref, w_ref, v0, n_h, bv, bh, inv_temp)
        cols = v0 + jax.lax.broadcasted_iota(jnp.int32, (bn, bv), 1)
        valid = cols < V
        z_or_0 = jnp.where(valid, z, 0.0)
        z = jnp.where(valid, z, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(z, axis=1))
        alpha = jnp.exp(m - m_new)
        e = jnp.exp(z - m_new[:, None])
        s = s * alpha + jnp.sum(e, axis=1)
        a = a * alpha + jnp.sum(e * z_or_0, axis=1)
        zt = zt + jnp.sum(jnp.where(cols == y[:, None], z_or_0, 0.0), axis=1)
        return m_new, s, a, zt

    init = (jnp.full((bn,), -jnp.inf, F32), jnp.zeros((bn,), F32), jnp.zeros((bn,), F32), jnp.zeros((bn,), F32))
    m, s, a, zt = jax.lax.fori_loop(0, n_v, body, init)
    lse = m + jnp.log(s)
    logp_ref[...] = zt - lse
    ent_ref[...] = lse - a / s
    lse_ref[...] = lse


def _bwd_dh_kernel(h_ref, w_ref, y_ref, lse_ref, ent_ref, glp_ref, gent_ref, inv_ref, dh_ref, *, V, n_v, n_h, bv, bh):
    bn = h_ref.shape[0]
    inv_temp = inv_ref[0]
    k0 = pl.program_id(1) * bh
    y, lse, ent, g_lp, g_ent = y_ref[...], lse_ref[...], ent_ref[...], glp_ref[...], gent_ref[...]

    def body(j, acc):
        v0 = j * bv
        z = _logit_tile(h_ref, w_ref, v0, n_h, bv, bh, inv_temp)
        cols = v0 + jax.lax.broadcasted_iota(jnp.int32, (bn, bv), 1)
        onehot = (cols == y[:, None]).astype(F32)
        dz = _dlogits(z, cols < V, onehot, lse, ent, g_lp, g_ent, inv_temp)
        wb = w_ref[pl.ds(v0, bv), pl.ds(k0, bh)].astype(F32)
        return acc + jnp.dot(dz, wb, preferred_element_type=F32)

    dh_ref[...] = jax.lax.fori_loop(0, n_v, body, jnp.zeros((bn, bh), F32))


def _bwd_dw_kernel(h_ref, w_ref, y_ref, lse_ref, ent_ref, glp_ref, gent_ref, inv_ref, dw_ref, *, V, n_n, n_h, bn, bh):
    bv = w_ref.shape[0]
    inv_temp = inv_ref[0]
    v0 = pl.program_id(0) * bv
    k0 = pl.program_id(1) * bh

    def body(i, acc):
        rows = pl.ds(i * bn, bn)
        z = jnp.zeros((bn, bv), F32)
        for k in range(n_h):  # static: the weight block is resident, slice it like the hidden rows
            hb = h_ref[rows, pl.ds(k * bh, bh)].astype(F32)
            wb = w_ref[:, pl.ds(k * bh, bh)].astype(F32)
            z = z + jnp.dot(hb, wb.T, preferred_element_type=F32)
        z = z * inv_temp
        cols = v0 + jax.lax.broadcasted_iota(jnp.int32, (bn, bv), 1)
        onehot = (cols == y_ref[rows][:, None]).astype(F32)
        dz = _dlogits(z, cols < V, onehot, lse_ref[rows], ent_ref[rows], glp_ref[rows], gent_ref[rows], inv_temp)
        hk = h_ref[rows, pl.ds(k0, bh)].astype(F32)
        return acc + jnp.dot(dz.T, hk, preferred_element_type=F32)

    dw_ref[...] = jax.lax.fori_loop(0, n_n, body, jnp.zeros((bv, bh), F32))


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    pad = -x.shape[axis] % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _inv_temperature(temperature: jax.Array) -> jax.Array:
    """``1 / temperature`` as a one-element input, so a traced temperature needs no recompilation."""
    return (1.0 / jnp.asarray(temperature, F32)).reshape(1)


def _default_blocks() -> tuple[int, int, int]:
    return (16, 64, 32) if _interpret() else (64, 128, 64)


def _run_fwd(h, w, y, temperature, blocks):
    bn, bv, bh = blocks
    n, v = h.shape[0], w.shape[0]
    hp, wp = _pad_to(_pad_to(h, 0, bn), 1, bh), _pad_to(_pad_to(w, 0, bv), 1, bh)
    yp = _pad_to(y, 0, bn)
    np_, hd = hp.shape
    kernel = partial(_fwd_kernel, V=v, n_v=wp.shape[0] // bv, n_h=hd // bh, bv=bv, bh=bh)
    row = pl.BlockSpec((bn,), lambda i: (i,))
    logp, ent, lse = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((np_,), F32)] * 3,
        grid=(np_ // bn,),
        in_specs=[pl.BlockSpec((bn, hd), lambda i: (i, 0)), pl.BlockSpec(wp.shape, lambda i: (0, 0)), row,
                  pl.BlockSpec((1,), lambda i: (0,))],
        out_specs=[row, row, row],
        interpret=_interpret(),
        compiler_params=_compiler_params(),
        name="diptych_logprobs_fwd",
    )(hp, wp, yp, _inv_temperature(temperature))
    return logp[:n], ent[:n], lse[:n]


def _run_bwd(h, w, y, lse, ent, g_lp, g_ent, temperature, blocks):
    bn, bv, bh = blocks
    n, v, hd0 = h.shape[0], w.shape[0], h.shape[1]
    hp, wp = _pad_to(_pad_to(h, 0, bn), 1, bh), _pad_to(_pad_to(w, 0, bv), 1, bh)
    vecs = [_pad_to(a, 0, bn) for a in (y, lse, ent, g_lp.astype(F32), g_ent.astype(F32))]
    np_, hd = hp.shape
    vp = wp.shape[0]
    common = dict(V=v, n_h=hd // bh, bh=bh)
    inv = _inv_temperature(temperature)
    row = pl.BlockSpec((bn,), lambda i, k: (i,))
    dh = pl.pallas_call(
        partial(_bwd_dh_kernel, n_v=vp // bv, bv=bv, **common),
        out_shape=jax.ShapeDtypeStruct((np_, hd), F32),
        grid=(np_ // bn, hd // bh),
        in_specs=[pl.BlockSpec((bn, hd), lambda i, k: (i, 0)), pl.BlockSpec(wp.shape, lambda i, k: (0, 0))]
        + [row] * 5 + [pl.BlockSpec((1,), lambda i, k: (0,))],
        out_specs=pl.BlockSpec((bn, bh), lambda i, k: (i, k)),
        interpret=_interpret(),
        compiler_params=_compiler_params(),
        name="diptych_logprobs_bwd_dh",
    )(hp, wp, *vecs, inv)
    full = pl.BlockSpec((np_,), lambda j, k: (0,))
    dw = pl.pallas_call(
        partial(_bwd_dw_kernel, n_n=np_ // bn, bn=bn, **common),
        out_shape=jax.ShapeDtypeStruct((vp, hd), F32),
        grid=(vp // bv, hd // bh),
        in_specs=[pl.BlockSpec(hp.shape, lambda j, k: (0, 0)), pl.BlockSpec((bv, hd), lambda j, k: (j, 0))]
        + [full] * 5 + [pl.BlockSpec((1,), lambda j, k: (0,))],
        out_specs=pl.BlockSpec((bv, bh), lambda j, k: (j, k)),
        interpret=_interpret(),
        compiler_params=_compiler_params(),
        name="diptych_logprobs_bwd_dw",
    )(hp, wp, *vecs, inv)
    return dh[:n, :hd0], dw[:v, :hd0]


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(h, w, y, temperature, blocks):
    logp, ent, _ = _run_fwd(h, w, y, temperature, blocks)
    return logp, ent


def _fused_fwd(h, w, y, temperature, blocks):
    logp, ent, lse = _run_fwd(h, w, y, temperature, blocks)
    return (logp, ent), (h, w, y, temperature, lse, ent)


def _fused_bwd(blocks, res, grads):
    h, w, y, temperature, lse, ent = res
    g_lp, g_ent = grads
    dh, dw = _run_bwd(h, w, y, lse, ent, g_lp, g_ent, temperature, blocks)
    return dh.astype(h.dtype), dw.astype(w.dtype), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_selective_logprobs(
    hidden: jax.Array,
    weight: jax.Array,
    targets: jax.Array,
    temperature: float | jax.Array = 1.0,
    blocks: tuple[int, int, int] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-token ``(logp, entropy)`` in float32 for ``hidden [N, H]``, ``weight [V, H]``, ``targets [N]``.

    ``blocks = (BLOCK_N, BLOCK_V, BLOCK_H)`` overrides the tile sizes (powers of two >= 16, so the
    same sizes are valid for the Triton lowering).
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"want hidden [N, H] and weight [V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}.")
    blocks = _default_blocks() if blocks is None else tuple(int(b) for b in blocks)
    if len(blocks) != 3 or min(blocks) < 16 or any(b & (b - 1) for b in blocks):
        raise ValueError(f"Pallas block sizes must be three powers of two >= 16; got {blocks}.")
    return _fused(hidden, weight, targets.astype(jnp.int32), jnp.asarray(temperature, F32), blocks)
