"""Numpy references for every kernel: the one oracle both twins (Pallas, Triton) are tested against.

Everything is computed in float64 from float32 copies of the inputs so that the reference is
more accurate than any kernel under test; a bf16 input is compared after the kernel's own
rounding of its inputs (callers pass the bf16-rounded values as float32).

Selective log-probs fused with the LM head: for hidden states ``h [N, H]``, output weight
``W [V, H]``, targets ``y [N]`` and temperature ``tau``,

    z = h @ W.T / tau,   logp = z[y] - logsumexp(z),   entropy = -sum(softmax(z) * log_softmax(z)).

With upstream gradients ``g_lp`` and ``g_ent`` the logit gradient is

    dz = g_lp * (onehot(y) - p) - g_ent * p * (log p + entropy),      d(h @ W.T) = dz / tau,

and ``dh = dlogits @ W``, ``dW = dlogits.T @ h``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "rms_norm",
    "rms_norm_backward",
    "selective_logprobs",
    "selective_logprobs_backward",
]


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def _check_logprob_inputs(h: np.ndarray, w: np.ndarray, targets: np.ndarray) -> None:
    if h.ndim != 2 or w.ndim != 2 or h.shape[1] != w.shape[1]:
        raise ValueError(
            f"selective_logprobs wants hidden [N, H] and weight [V, H] with the same H; got hidden "
            f"{tuple(h.shape)} and weight {tuple(w.shape)} (pass lm_head.weight, not its transpose)."
        )
    if targets.shape != (h.shape[0],):
        raise ValueError(f"targets must have shape [N] = ({h.shape[0]},); got {tuple(targets.shape)}.")
    if targets.size and (targets.min() < 0 or targets.max() >= w.shape[0]):
        raise ValueError(f"targets must lie in [0, {w.shape[0]}); got range [{targets.min()}, {targets.max()}].")


def _softmax_stats(h: np.ndarray, w: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    z = _f64(h) @ _f64(w).T / float(temperature)
    m = z.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=-1))
    return z, lse


def selective_logprobs(
    h: np.ndarray, w: np.ndarray, targets: np.ndarray, temperature: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-token log-prob of the target and entropy of ``softmax(h @ W.T / temperature)`` (float64)."""
    targets = np.asarray(targets)
    _check_logprob_inputs(np.asarray(h), np.asarray(w), targets)
    z, lse = _softmax_stats(h, w, temperature)
    logp_all = z - lse[:, None]
    logp = np.take_along_axis(logp_all, targets[:, None].astype(np.int64), axis=-1)[:, 0]
    entropy = -(np.exp(logp_all) * logp_all).sum(axis=-1)
    return logp, entropy


def selective_logprobs_backward(
    h: np.ndarray,
    w: np.ndarray,
    targets: np.ndarray,
    temperature: float,
    grad_logp: np.ndarray,
    grad_entropy: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gradients ``(dh [N, H], dW [V, H])`` of ``sum(grad_logp * logp + grad_entropy * entropy)``."""
    targets = np.asarray(targets)
    _check_logprob_inputs(np.asarray(h), np.asarray(w), targets)
    z, lse = _softmax_stats(h, w, temperature)
    logp_all = z - lse[:, None]
    p = np.exp(logp_all)
    entropy = -(p * logp_all).sum(axis=-1)
    g_lp = _f64(grad_logp)[:, None]
    g_ent = np.zeros_like(g_lp) if grad_entropy is None else _f64(grad_entropy)[:, None]
    onehot = np.zeros_like(z)
    onehot[np.arange(z.shape[0]), targets.astype(np.int64)] = 1.0
    dz = g_lp * (onehot - p) - g_ent * p * (logp_all + entropy[:, None])
    dlogits = dz / float(temperature)
    return dlogits @ _f64(w), dlogits.T @ _f64(h)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last axis (float64)."""
    x64 = _f64(x)
    rstd = 1.0 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + eps)
    return x64 * rstd * _f64(weight)


def rms_norm_backward(
    x: np.ndarray, weight: np.ndarray, eps: float, grad_out: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Gradients ``(dx, dweight)`` of ``sum(grad_out * rms_norm(x, weight, eps))``.

    With ``xhat = x * rstd`` and ``g = grad_out * weight``: ``dx = rstd * (g - xhat * mean(g * xhat))``
    and ``dweight = sum over rows of grad_out * xhat``.
    """
    x64, w64, go = _f64(x), _f64(weight), _f64(grad_out)
    rstd = 1.0 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + eps)
    xhat = x64 * rstd
    g = go * w64
    dx = rstd * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    dw = (go * xhat).reshape(-1, x64.shape[-1]).sum(axis=0)
    return dx, dw
