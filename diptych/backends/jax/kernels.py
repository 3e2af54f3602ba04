"""Kernel dispatch for the JAX panel: selective log-probs fused with the LM head, and RMSNorm.

``kernels`` picks the implementation, in the same words on both backends:

- ``"reference"``: the naive framework path. It materialises the full ``[N, V]`` logits and lets
  autodiff do the rest; the baseline every other path must equal.
- ``"chunked"``: plain jnp over chunks of tokens inside a ``jax.custom_vjp``: the forward keeps only
  per-token statistics, the backward recomputes each chunk's logits, so at most one
  ``[chunk_size, V]`` block of logits is alive at a time. Runs anywhere.
- ``"fused"``: the Pallas kernels in ``diptych.kernels.pallas`` (interpret mode when the default
  device is a CPU, Triton lowering on GPU).
- ``"auto"``: fused on GPU, chunked on CPU (interpret mode is for proofs, not speed) and on TPU
  (no TPU variant of the kernels yet; asking for ``fused`` there raises).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from diptych.kernels.checks import KERNEL_MODES, check_selective_logprobs_inputs

__all__ = ["KERNEL_MODES", "resolve_kernels", "rms_norm", "selective_logprobs"]


def resolve_kernels(kernels: str | None) -> str:
    """The concrete implementation ``auto`` (or ``None``) stands for on the default JAX device."""
    kernels = "auto" if kernels is None else kernels
    if kernels not in KERNEL_MODES:
        raise ValueError(f"kernels={kernels!r} is not one of {KERNEL_MODES}.")
    if kernels == "auto":
        return "fused" if jax.default_backend() == "gpu" else "chunked"
    if kernels == "fused" and jax.default_backend() == "tpu":
        raise RuntimeError(
            "kernels='fused' has no TPU variant yet: the Pallas kernels read the whole LM head through a "
            "full-array block (GPU pointer semantics), which does not fit TPU VMEM; use kernels='chunked' on TPU."
        )
    if kernels == "fused":
        try:
            from jax.experimental import pallas  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the jax build
            raise RuntimeError(
                "kernels='fused' needs jax.experimental.pallas, which this jax build lacks; "
                "use kernels='chunked' or install a jax with Pallas (jax>=0.4.30)."
            ) from e
    return kernels


# -- selective log-probs ------------------------------------------------------------------------


def selective_logprobs(
    hidden: jax.Array,
    weight: jax.Array,
    targets: jax.Array,
    temperature: float | jax.Array = 1.0,
    kernels: str = "auto",
    chunk_size: int = 1024,
) -> tuple[jax.Array, jax.Array]:
    """``log_softmax(hidden @ weight.T / temperature)[targets]`` and the entropy, both float32.

    ``hidden`` is ``[..., H]`` (typically ``[N, H]``), ``weight`` is the LM head ``[V, H]`` and
    ``targets`` has ``hidden``'s leading shape. Differentiable w.r.t. ``hidden`` and ``weight``.
    Logits are always computed in float32 whatever the input dtype. ``temperature`` may be a
    traced scalar (e.g. an argument of the caller's ``jit``); it gets no gradient.
    """
    lead = hidden.shape[:-1]
    check_selective_logprobs_inputs(hidden, weight, targets, temperature, chunk_size)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1).astype(jnp.int32)
    mode = resolve_kernels(kernels)
    if mode == "reference":
        logp, ent = _naive_logprobs(h2, weight, y, temperature)
    elif mode == "chunked":
        logp, ent = _chunked_logprobs(h2, weight, y, jnp.asarray(temperature, jnp.float32), int(chunk_size))
    else:
        from diptych.kernels.pallas.logprobs import fused_selective_logprobs

        logp, ent = fused_selective_logprobs(h2, weight, y, temperature)
    return logp.reshape(lead), ent.reshape(lead)


def _chunk_stats(h: jax.Array, w: jax.Array, y: jax.Array, temperature: Any):
    """Float32 logits of one chunk and what the forward and backward need from them."""
    z = jnp.dot(h.astype(jnp.float32), w.astype(jnp.float32).T) / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    logp_all = z - lse[:, None]
    p = jnp.exp(logp_all)
    ent = -jnp.sum(p * logp_all, axis=-1)
    logp = jnp.take_along_axis(logp_all, y[:, None], axis=-1)[:, 0]
    return logp_all, p, logp, ent


def _naive_logprobs(h: jax.Array, w: jax.Array, y: jax.Array, temperature: Any):
    _, _, logp, ent = _chunk_stats(h, w, y, temperature)
    return logp, ent


def _as_chunks(x: jax.Array, chunk: int) -> jax.Array:
    n = x.shape[0]
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(n_chunks, chunk, *x.shape[1:])


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_logprobs(h: jax.Array, w: jax.Array, y: jax.Array, temperature: jax.Array, chunk_size: int):
    return _chunked_fwd(h, w, y, temperature, chunk_size)[0]


def _chunked_fwd(h, w, y, temperature, chunk_size):
    n = h.shape[0]
    chunk = max(1, min(chunk_size, n))

    def one(args):
        h_c, y_c = args
        _, _, logp, ent = _chunk_stats(h_c, w, y_c, temperature)
        return logp, ent

    logp, ent = jax.lax.map(one, (_as_chunks(h, chunk), _as_chunks(y, chunk)))
    logp, ent = logp.reshape(-1)[:n], ent.reshape(-1)[:n]
    return (logp, ent), (h, w, y, temperature, ent)


def _chunked_bwd(chunk_size, res, grads):
    h, w, y, temperature, ent = res
    g_lp, g_ent = grads
    n = h.shape[0]
    chunk = max(1, min(chunk_size, n))
    w32 = w.astype(jnp.float32)

    def step(dw, args):
        h_c, y_c, glp_c, gent_c, ent_c = args
        logp_all, p, _, _ = _chunk_stats(h_c, w32, y_c, temperature)
        onehot = jax.nn.one_hot(y_c, w.shape[0], dtype=jnp.float32)
        dz = glp_c[:, None] * (onehot - p) - gent_c[:, None] * p * (logp_all + ent_c[:, None])
        dlogits = dz / temperature
        return dw + dlogits.T @ h_c.astype(jnp.float32), dlogits @ w32

    chunks = [_as_chunks(a, chunk) for a in (h, y, g_lp.astype(jnp.float32), g_ent.astype(jnp.float32), ent)]
    dw, dh = jax.lax.scan(step, jnp.zeros(w.shape, jnp.float32), tuple(chunks))
    dh = dh.reshape(-1, h.shape[1])[:n]
    return dh.astype(h.dtype), dw.astype(w.dtype), None, None


_chunked_logprobs.defvjp(_chunked_fwd, _chunked_bwd)


# -- RMSNorm ------------------------------------------------------------------------------------


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, kernels: str = "auto") -> jax.Array:
    """RMSNorm over the last axis in Hugging Face's order: normalise in float32, cast back, times weight.

    ``reference`` and ``chunked`` are the same plain jnp expression (a norm has no ``[N, V]`` to
    chunk); ``fused`` is the Pallas kernel, which rounds at the same points so it matches exactly.
    """
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm weight must have shape ({x.shape[-1]},) to match x {tuple(x.shape)}; "
                         f"got {tuple(weight.shape)}.")
    if resolve_kernels(kernels) == "fused":
        from diptych.kernels.pallas.rms_norm import fused_rms_norm

        return fused_rms_norm(x, weight, float(eps))
    return rms_norm_plain(x, weight, eps)


def rms_norm_plain(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    return weight * (xf * jax.lax.rsqrt(var + eps)).astype(x.dtype)
