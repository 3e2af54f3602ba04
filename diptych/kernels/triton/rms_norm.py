"""Triton twin of RMSNorm, rounding where Hugging Face rounds so a fused model equals the plain one.

Forward: ``y = weight * cast(x * rstd, x.dtype)`` with the statistics in float32; one program per
``BLOCK_R`` rows, the whole (power-of-two padded) hidden row in registers, ``rstd`` kept for the
backward. Backward: ``dx = rstd * (g - xhat * mean(g * xhat))`` with ``g = dy * weight`` and, per
program, a partial ``dweight`` row summed afterwards in torch (no atomics, which the interpreter
lacks for bf16 and which would make the sum order nondeterministic).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["fused_rms_norm"]


@triton.jit
def _round_to_bf16(x):
    """Round float32 to the nearest bf16 (ties to even), kept in float32.

    Done on the bits because the interpreter's float32 -> bf16 cast truncates instead of rounding.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, N, H, eps,
                BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, ROUND_BF16: tl.constexpr, ROUND_F16: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    rmask = rows < N
    mask = rmask[:, None] & (cols[None, :] < H)
    x = tl.load(x_ptr + rows[:, None] * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / H + eps)
    xhat = x * rstd[:, None]
    if ROUND_BF16:
        xhat = _round_to_bf16(xhat)
    if ROUND_F16:
        xhat = xhat.to(tl.float16).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * H + cols[None, :], xhat * w[None, :], mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _bwd_kernel(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, N, H,
                BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    rmask = rows < N
    cmask = cols < H
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * H + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    xhat = x * rstd[:, None]
    g = dy * w[None, :]
    dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / H)[:, None])
    tl.store(dx_ptr + offs, dx, mask=mask)
    tl.store(dw_partial_ptr + pid * H + cols, tl.sum(dy * xhat, axis=0), mask=cmask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_r(h: int) -> int:
    if _interpreting():
        return 16
    return max(1, min(16, 8192 // triton.next_power_of_2(h)))


class _FusedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        n, h = x2.shape
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        # The interpreter truncates when it stores float32 into bf16; let torch round instead.
        y_dtype = torch.float32 if _interpreting() else out_dtype
        y = torch.empty((n, h), dtype=y_dtype, device=x.device)
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
        br, bh = _block_r(h), triton.next_power_of_2(h)
        _fwd_kernel[(triton.cdiv(n, br),)](
            x2, weight.contiguous(), y, rstd, n, h, eps, BLOCK_R=br, BLOCK_H=bh,
            ROUND_BF16=x.dtype == torch.bfloat16, ROUND_F16=x.dtype == torch.float16)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.to(out_dtype).reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n, h = x2.shape
        br, bh = _block_r(h), triton.next_power_of_2(h)
        programs = triton.cdiv(n, br)
        dx = torch.empty((n, h), dtype=torch.float32, device=x2.device)
        dw_partial = torch.empty((programs, h), dtype=torch.float32, device=x2.device)
        _bwd_kernel[(programs,)](x2, weight.contiguous(), dy.reshape(n, h).contiguous(), rstd, dx, dw_partial, n, h,
                                 BLOCK_R=br, BLOCK_H=bh)
        return dx.to(x2.dtype).reshape(ctx.shape), dw_partial.sum(0).to(weight.dtype), None


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis; differentiable w.r.t. ``x`` and ``weight``; output dtype promote(x, weight)."""
    if tuple(weight.shape) != tuple(x.shape[-1:]):
        raise ValueError(f"weight must have shape ({x.shape[-1]},); got {tuple(weight.shape)}.")
    return _FusedRMSNorm.apply(x, weight, float(eps))
