"""Kernel dispatch for the torch panel: selective log-probs fused with the LM head, and RMSNorm.

``kernels`` picks the implementation, in the same words on both backends:

- ``"reference"``: the naive framework path. It materialises the full ``[N, V]`` logits and lets
  autograd do the rest; the baseline every other path must equal.
- ``"chunked"``: plain torch over chunks of tokens inside a ``torch.autograd.Function``: the
  forward keeps only per-token statistics, the backward recomputes each chunk's logits, so at
  most one ``[chunk_size, V]`` block of logits is alive at a time. Runs anywhere.
- ``"fused"``: the Triton kernels in ``diptych.kernels.triton`` (CUDA tensors, or CPU tensors
  when ``TRITON_INTERPRET=1`` was set before triton was imported).
- ``"auto"``: fused for CUDA tensors when triton is installed, chunked otherwise.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from diptych.kernels.checks import KERNEL_MODES, check_selective_logprobs_inputs

__all__ = ["KERNEL_MODES", "resolve_kernels", "rms_norm", "selective_logprobs"]


def _triton_available() -> bool:
    # find_spec, not import: triton reads TRITON_INTERPRET when first imported, so importing it
    # here could fix the wrong mode for the rest of the process.
    return importlib.util.find_spec("triton") is not None


def resolve_kernels(kernels: str | None, device: torch.device | None = None) -> str:
    """The concrete implementation ``auto`` (or ``None``) stands for with tensors on ``device``."""
    kernels = "auto" if kernels is None else kernels
    if kernels not in KERNEL_MODES:
        raise ValueError(f"kernels={kernels!r} is not one of {KERNEL_MODES}.")
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if kernels == "auto":
        return "fused" if on_cuda and _triton_available() else "chunked"
    if kernels == "fused":
        if not _triton_available():
            raise RuntimeError("kernels='fused' needs triton (pip install 'diptych[triton]'); "
                               "use kernels='chunked' on this machine.")
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"kernels='fused' runs Triton kernels, which need CUDA tensors (got device {device}); "
                "use kernels='chunked' on CPU, or set TRITON_INTERPRET=1 before importing triton to "
                "run them (slowly) in the interpreter."
            )
    return kernels


# -- selective log-probs ------------------------------------------------------------------------


def selective_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    kernels: str = "auto",
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target log-probs of ``softmax(hidden @ weight.T / temperature)`` and its entropy, float32, in torch.

    Shapes as in the JAX twin: ``hidden [..., H]``, LM head ``weight [V, H]``, ``targets`` of ``hidden``'s
    leading shape; gradients flow to ``hidden`` and ``weight``; the logits are float32 for any input dtype.
    """
    lead = hidden.shape[:-1]
    check_selective_logprobs_inputs(hidden, weight, targets, temperature, chunk_size)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1).long()
    mode = resolve_kernels(kernels, hidden.device)
    if mode == "reference":
        logp, ent = _naive_logprobs(h2, weight, y, float(temperature))
    elif mode == "chunked":
        logp, ent = _ChunkedLogprobs.apply(h2, weight, y, float(temperature), int(chunk_size))
    else:
        from diptych.kernels.triton.logprobs import fused_selective_logprobs

        logp, ent = fused_selective_logprobs(h2, weight, y, float(temperature))
    return logp.reshape(lead), ent.reshape(lead)


def _chunk_stats(h: torch.Tensor, w32: torch.Tensor, y: torch.Tensor, temperature: float):
    """Float32 logits of one chunk and what the forward and backward need from them."""
    z = (h.float() @ w32.T) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    ent = -(p * logp_all).sum(-1)
    logp = logp_all.gather(-1, y[:, None])[:, 0]
    return logp_all, p, logp, ent


def _naive_logprobs(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, temperature: float):
    _, _, logp, ent = _chunk_stats(h, w.float(), y, temperature)
    return logp, ent


class _ChunkedLogprobs(torch.autograd.Function):
    """Forward keeps per-token stats only; backward recomputes logits one chunk of tokens at a time."""

    @staticmethod
    def forward(ctx, h, w, y, temperature: float, chunk_size: int):
        w32 = w.float()
        logp = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        ent = torch.empty_like(logp)
        with torch.no_grad():
            for s in range(0, h.shape[0], chunk_size):
                _, _, logp[s:s + chunk_size], ent[s:s + chunk_size] = _chunk_stats(
                    h[s:s + chunk_size], w32, y[s:s + chunk_size], temperature)
        ctx.save_for_backward(h, w, y, ent)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        h, w, y, ent = ctx.saved_tensors
        t, c = ctx.temperature, ctx.chunk_size
        w32 = w.float()
        g_lp = torch.zeros_like(ent) if g_lp is None else g_lp.float()
        g_ent = torch.zeros_like(ent) if g_ent is None else g_ent.float()
        dh = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for s in range(0, h.shape[0], c):
            h_c, y_c = h[s:s + c], y[s:s + c]
            # In place on two [chunk, V] buffers: this loop is where the memory goes.
            logp_all = torch.log_softmax((h_c.float() @ w32.T).div_(t), dim=-1)
            p = logp_all.exp()
            dz = logp_all.add_(ent[s:s + c, None]).mul_(p).mul_(-g_ent[s:s + c, None])
            dz.addcmul_(p, g_lp[s:s + c, None], value=-1.0)
            del p
            dz.scatter_add_(-1, y_c[:, None], g_lp[s:s + c, None])
            dz.div_(t)
            dh[s:s + c] = dz @ w32
            dw.addmm_(dz.T, h_c.float())
            del dz, logp_all
        return dh.to(h.dtype), dw.to(w.dtype), None, None, None


# -- RMSNorm ------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernels: str = "auto") -> torch.Tensor:
    """RMSNorm over the last axis in Hugging Face's order: normalise in float32, cast back, times weight.

    ``reference`` and ``chunked`` are the same plain torch expression (a norm has no ``[N, V]`` to
    chunk); ``fused`` is the Triton kernel, which rounds at the same points so it matches exactly.
    """
    if tuple(weight.shape) != tuple(x.shape[-1:]):
        raise ValueError(f"rms_norm weight must have shape ({x.shape[-1]},) to match x {tuple(x.shape)}; "
                         f"got {tuple(weight.shape)}.")
    if resolve_kernels(kernels, x.device) == "fused":
        from diptych.kernels.triton.rms_norm import fused_rms_norm

        return fused_rms_norm(x, weight, float(eps))
    return rms_norm_plain(x, weight, eps)


def rms_norm_plain(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    var = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(var + eps)).to(x.dtype)
