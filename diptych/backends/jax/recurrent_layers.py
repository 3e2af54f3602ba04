"""The layers of JAX recurrent-depth (Huginn) models: parameters, sandwich blocks, one iteration.

Shared by the full-sequence model (``diptych.backends.jax.recurrent``) and KV-cached decoding
(``diptych.backends.jax.recurrent_cache``), which both import it, so neither imports the
other's internals. Mirrors ``diptych.backends.torch.recurrent_layers``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diptych.core.recurrent_spec import RecurrentSpec

_NEG = -1e30
Params = dict[str, jax.Array]


class RecurrentLM(nnx.Module):
    """Huginn's ``RavenForCausalLM`` weights; ``spec`` and ``dtype`` ride along for the facade."""

    def __init__(self, spec: RecurrentSpec, weights: dict[str, np.ndarray], dtype: str) -> None:
        self.spec = spec
        self.dtype_name = dtype
        self.params = nnx.data({k: nnx.Param(jnp.asarray(np.asarray(v, np.float32), dtype=dtype))
                                for k, v in weights.items()})

    def param_dict(self) -> Params:
        return {k: v[...] for k, v in self.params.items()}


# -- math shared by every entry point ------------------------------------------------------
def _linear(P: Params, name: str, x: jax.Array) -> jax.Array:
    """``x @ P[name].T``, or the LoRA view's own product (``diptych.backends.jax.lora.LoRAParams.linear``), which
    applies the adapter to ``dropout(x)`` in a train step: a merged weight cannot drop the adapter's input."""
    linear = getattr(P, "linear", None)
    return x @ P[name].T if linear is None else linear(name, x)


def _iteration(P: Params, i: Any) -> Params:
    """``P`` for recurrence ``i``: a LoRA view with a dropout key folds ``i`` into it (a fresh mask per
    iteration); anything else is ``P`` itself."""
    fold = getattr(P, "iteration", None)
    return P if fold is None else fold(i)


def _has_rng(P: Params) -> bool:
    return getattr(P, "rng", None) is not None


def _rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)).astype(x.dtype) * w


def _rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate interleaved pairs (x[2j], x[2j+1]) as complex numbers, in float32 like Huginn."""
    cos, sin = rope
    xf = x.astype(jnp.float32)
    re, im = xf[..., 0::2], xf[..., 1::2]
    out = jnp.stack([re * cos - im * sin, im * cos + re * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def _rope_tables(positions: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    inv = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    ang = positions.astype(jnp.float32)[..., None] * inv
    return jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    rep = q.shape[2] // k.shape[2]
    if rep > 1:
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    scores = jnp.einsum("bshd,bkhd->bhsk", q, k).astype(jnp.float32) / (q.shape[-1] ** 0.5)
    scores = jnp.where(allowed[:, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhsk,bkhd->bshd", probs, v)


def _qkv(P: Params, p: str, spec: RecurrentSpec, x: jax.Array, rope) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rotated q, k and v of a sandwich block's attention: what a KV cache stores (k, v)."""
    nh, nkv, hd = spec.n_heads, spec.num_key_value_heads, spec.head_dim
    B, S, _ = x.shape
    qkv = _linear(P, p + "attn.Wqkv.weight", _rms_norm(x, P[p + "norm_1.weight"], spec.norm_eps))
    q = qkv[..., : nh * hd].reshape(B, S, nh, hd)
    k = qkv[..., nh * hd: (nh + nkv) * hd].reshape(B, S, nkv, hd)
    v = qkv[..., (nh + nkv) * hd:].reshape(B, S, nkv, hd)
    if spec.qk_bias:
        q, k = q + P[p + "attn.qk_bias"][0], k + P[p + "attn.qk_bias"][1]
    return _rope(q, rope), _rope(k, rope), v


def _block_out(P: Params, p: str, spec: RecurrentSpec, x: jax.Array, y: jax.Array) -> jax.Array:
    """The rest of a sandwich block after attention produced ``y`` [B, S, heads, head_dim]."""
    eps = spec.norm_eps
    a = _linear(P, p + "attn.proj.weight", y.reshape(*x.shape[:2], -1))
    x = _rms_norm(a + x, P[p + "norm_2.weight"], eps)
    gate, up = jnp.split(_linear(P, p + "mlp.fc.weight", _rms_norm(x, P[p + "norm_3.weight"], eps)), 2, axis=-1)
    m = _linear(P, p + "mlp.proj.weight", jax.nn.silu(gate) * up)
    return _rms_norm(m + x, P[p + "norm_4.weight"], eps)


def _block(P: Params, p: str, spec: RecurrentSpec, x: jax.Array, rope, allowed: jax.Array) -> jax.Array:
    q, k, v = _qkv(P, p, spec, x, rope)
    return _block_out(P, p, spec, x, _attend(q, k, v, allowed))


class Context:
    """What every iteration needs besides the state: the prelude output e, RoPE tables, the mask."""

    def __init__(self, e: jax.Array, rope, allowed: jax.Array) -> None:
        self.e, self.rope, self.allowed = e, rope, allowed


def _prelude(P: Params, spec: RecurrentSpec, tokens: jax.Array, mask: jax.Array) -> Context:
    positions = jnp.clip(jnp.cumsum(mask, -1) - 1, 0, None)
    rope = _rope_tables(positions, spec.head_dim, spec.rope_base)
    S = tokens.shape[1]
    allowed = jnp.tril(jnp.ones((S, S), bool))[None] & (mask[:, None, :] > 0)
    e = P["transformer.wte.weight"][tokens] * jnp.asarray(spec.embed_scale, P["transformer.wte.weight"].dtype)
    for i in range(spec.n_layers_in_prelude):
        e = _block(P, f"transformer.prelude.{i}.", spec, e, rope, allowed)
    return Context(e, rope, allowed)


def _core_step(P: Params, spec: RecurrentSpec, ctx: Context, x: jax.Array, e: jax.Array) -> jax.Array:
    """One recurrence: s <- core_block(adapter(concat[s, e]))."""
    x = _linear(P, "transformer.adapter.weight", jnp.concatenate([x, e], axis=-1))
    if "transformer.adapter.bias" in P:
        x = x + P["transformer.adapter.bias"]
    for i in range(spec.n_layers_in_recurrent_block):
        x = _block(P, f"transformer.core_block.{i}.", spec, x, ctx.rope, ctx.allowed)
    return x


def _final_hidden(P: Params, spec: RecurrentSpec, ctx: Context, x: jax.Array) -> jax.Array:
    """ln_f after the recurrence, the coda, ln_f again: what the head reads."""
    x = _rms_norm(x, P["transformer.ln_f.weight"], spec.norm_eps)
    for i in range(spec.n_layers_in_coda):
        x = _block(P, f"transformer.coda.{i}.", spec, x, ctx.rope, ctx.allowed)
    return _rms_norm(x, P["transformer.ln_f.weight"], spec.norm_eps)


def _head(P: Params, spec: RecurrentSpec) -> jax.Array:
    return P["transformer.wte.weight"] if spec.tie_embeddings else P["lm_head.weight"]


def _readout(P: Params, spec: RecurrentSpec, ctx: Context, x: jax.Array) -> jax.Array:
    """Float32 logits from a latent state."""
    return (_final_hidden(P, spec, ctx, x) @ _head(P, spec).T).astype(jnp.float32)


def _loop(P: Params, spec: RecurrentSpec, ctx: Context, x: jax.Array, n_no_grad: Any, n_grad: int,
          remat: bool) -> jax.Array:
    """r - k iterations with no tape (while_loop on constants), then k differentiable ones."""
    Pc = jax.lax.stop_gradient(P)
    cc = Context(jax.lax.stop_gradient(ctx.e), ctx.rope, ctx.allowed)
    x0 = jax.lax.stop_gradient(x)
    x_ng = jax.lax.fori_loop(0, n_no_grad, lambda i, s: _core_step(_iteration(Pc, i), spec, cc, s, cc.e), x0)
    x = jnp.where(jnp.asarray(n_no_grad) > 0, jax.lax.stop_gradient(x_ng), x)

    def body(s, i):
        return _core_step(_iteration(P, i), spec, ctx, s, ctx.e), None

    if n_grad:
        body = jax.checkpoint(body) if remat else body
        # under LoRA dropout each iteration is numbered (its masks fold it in); else the scan is unchanged
        xs = jnp.arange(n_grad) + jnp.asarray(n_no_grad) if _has_rng(P) else None
        x, _ = jax.lax.scan(body, x, xs, length=n_grad)
    return x
