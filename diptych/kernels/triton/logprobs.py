"""Triton twin of the fused selective log-prob kernel (LM head + log-softmax + gather + entropy).

The forward tiles tokens (one program per ``BLOCK_N`` tokens) and walks the vocabulary in
``BLOCK_V`` columns with an online logsumexp, so the ``[N, V]`` logits never exist in memory; it
keeps per-token ``lse`` for the backward. The backward recomputes logit tiles twice, once in a
kernel gridded over (tokens, hidden) that accumulates ``dh`` and once over (vocab, hidden) that
accumulates ``dW``, so neither needs atomics. See ``diptych.kernels.reference`` for the maths.

Interpreter rules (CPU, ``TRITON_INTERPRET=1``): every load is upcast to float32 before any
arithmetic, because the interpreter computes bf16 dots and sums wrongly without an error. On a
GPU, bf16 inputs keep bf16 tensor-core dots with float32 accumulation; float32 inputs use IEEE
dots (no TF32), matching DESIGN.md's parity rule.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["fused_selective_logprobs"]

NEG_INF = float("-inf")


@triton.jit
def _logit_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w, inv_temp,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``(h[rows] @ w[cols].T) * inv_temp`` as a float32 ``[BLOCK_N, BLOCK_V]`` tile, looping over H."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        kmask = ks < H
        hb = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wb = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
        if UPCAST:
            hb = hb.to(tl.float32)
            wb = wb.to(tl.float32)
        acc += tl.dot(hb, wb, input_precision=PRECISION)
    return acc * inv_temp


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, y_ptr, logp_ptr, ent_ptr, lse_ptr, N, V, H, stride_h, stride_w, inv_temp,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    y = tl.load(y_ptr + rows, mask=rmask, other=0)
    m = tl.full([BLOCK_N], NEG_INF, dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum exp(z - m)
    a = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum exp(z - m) * z, for the entropy
    zt = tl.zeros([BLOCK_N], dtype=tl.float32)  # the target's logit
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        z = _logit_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w, inv_temp,
                        BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
        z_or_0 = tl.where(cmask[None, :], z, 0.0)
        z = tl.where(cmask[None, :], z, NEG_INF)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        a = a * alpha + tl.sum(e * z_or_0, axis=1)
        zt += tl.sum(tl.where(cols[None, :] == y[:, None], z_or_0, 0.0), axis=1)
        m = m_new
    lse = m + tl.log(s)
    tl.store(logp_ptr + rows, zt - lse, mask=rmask)
    tl.store(ent_ptr + rows, lse - a / s, mask=rmask)
    tl.store(lse_ptr + rows, lse, mask=rmask)


@triton.jit
def _dlogits_tile(z, rows, cols, rmask, cmask, y_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, inv_temp):
    """``d loss / d (h @ W.T)`` for one tile: ``(g_lp (onehot - p) - g_ent p (log p + H)) / T``."""
    y = tl.load(y_ptr + rows, mask=rmask, other=0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=rmask, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=rmask, other=0.0)
    g_ent = tl.load(gent_ptr + rows, mask=rmask, other=0.0)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
    dz = g_lp[:, None] * (onehot - p) - g_ent[:, None] * p * (logp + ent[:, None])
    return tl.where(rmask[:, None] & cmask[None, :], dz * inv_temp, 0.0)


@triton.jit
def _bwd_dh_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dh_ptr,
                   N, V, H, stride_h, stride_w, inv_temp,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < N
    hmask = hs < H
    acc = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        z = _logit_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w, inv_temp,
                        BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
        dz = _dlogits_tile(z, rows, cols, rmask, cmask, y_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, inv_temp)
        wb = tl.load(w_ptr + cols[:, None] * stride_w + hs[None, :], mask=cmask[:, None] & hmask[None, :], other=0.0)
        acc += tl.dot(dz, wb.to(tl.float32), input_precision=PRECISION)
    tl.store(dh_ptr + rows[:, None] * H + hs[None, :], acc, mask=rmask[:, None] & hmask[None, :])


@triton.jit
def _bwd_dw_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dw_ptr,
                   N, V, H, stride_h, stride_w, inv_temp,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < V
    hmask = hs < H
    acc = tl.zeros([BLOCK_V, BLOCK_H], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        rmask = rows < N
        z = _logit_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w, inv_temp,
                        BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
        dz = _dlogits_tile(z, rows, cols, rmask, cmask, y_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, inv_temp)
        hb = tl.load(h_ptr + rows[:, None] * stride_h + hs[None, :], mask=rmask[:, None] & hmask[None, :], other=0.0)
        acc += tl.dot(tl.trans(dz), hb.to(tl.float32), input_precision=PRECISION)
    tl.store(dw_ptr + cols[:, None] * H + hs[None, :], acc, mask=cmask[:, None] & hmask[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _config(h: torch.Tensor, blocks: tuple[int, int, int] | None) -> dict:
    upcast = _interpreting() or h.dtype == torch.float32
    if blocks is None:
        blocks = (16, 64, 32) if _interpreting() else (64, 128, 64)
    bn, bv, bh = blocks
    if min(blocks) < 16 or any(b & (b - 1) for b in blocks):
        raise ValueError(f"Triton block sizes must be powers of two >= 16 (tl.dot's minimum); got {blocks}.")
    # IEEE fp32 dots when computing in fp32 (parity: no TF32); bf16 inputs keep the default (tensor cores).
    return dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, UPCAST=upcast, PRECISION="ieee" if upcast else None)


class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, y, temperature: float, blocks):
        h, w, y = h.contiguous(), w.contiguous(), y.contiguous()
        n, hd = h.shape
        v = w.shape[0]
        cfg = _config(h, blocks)
        logp = torch.empty(n, dtype=torch.float32, device=h.device)
        ent, lse = torch.empty_like(logp), torch.empty_like(logp)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
        _fwd_kernel[grid](h, w, y, logp, ent, lse, n, v, hd, h.stride(0), w.stride(0), 1.0 / temperature, **cfg)
        ctx.save_for_backward(h, w, y, lse, ent)
        ctx.temperature, ctx.cfg = temperature, cfg
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        h, w, y, lse, ent = ctx.saved_tensors
        cfg = ctx.cfg
        n, hd = h.shape
        v = w.shape[0]
        g_lp = torch.zeros_like(ent) if g_lp is None else g_lp.float().contiguous()
        g_ent = torch.zeros_like(ent) if g_ent is None else g_ent.float().contiguous()
        dh = torch.empty((n, hd), dtype=torch.float32, device=h.device)
        dw = torch.empty((v, hd), dtype=torch.float32, device=w.device)
        args = (h, w, y, lse, ent, g_lp, g_ent)
        scalars = (n, v, hd, h.stride(0), w.stride(0), 1.0 / ctx.temperature)
        grid_h = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(hd, cfg["BLOCK_H"]))
        _bwd_dh_kernel[grid_h](*args, dh, *scalars, **cfg)
        grid_w = (triton.cdiv(v, cfg["BLOCK_V"]), triton.cdiv(hd, cfg["BLOCK_H"]))
        _bwd_dw_kernel[grid_w](*args, dw, *scalars, **cfg)
        return dh.to(h.dtype), dw.to(w.dtype), None, None, None


def fused_selective_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    blocks: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(logp, entropy)`` in float32 for ``hidden [N, H]``, ``weight [V, H]``, ``targets [N]``.

    ``blocks = (BLOCK_N, BLOCK_V, BLOCK_H)`` overrides the tile sizes (powers of two >= 16).
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"want hidden [N, H] and weight [V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}.")
    if hidden.device.type != "cuda" and not _interpreting():
        raise RuntimeError("Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before importing triton.")
    return _FusedLogprobs.apply(hidden, weight, targets.long(), float(temperature), blocks)
