"""The Llama / Qwen2 / Qwen3 / Mistral / SmolLM3 decoder in Flax NNX, with a preallocated KV cache.

The math follows transformers' own implementation line for line (RMSNorm in float32 then
cast back before the weight, rotate-half RoPE, softmax in float32), so logits match
each family's ``*ForCausalLM`` to 1e-5 in fp32. RoPE frequencies (every scaling type) come from
``diptych.core.rope`` through the spec; Mistral's sliding window is part of the attention mask. Module
attribute names are the Hugging Face parameter names, so the flattened ``nnx.Param`` state
*is* the canonical weight dict. ``diptych.backends.torch.model`` is the same text in torch.nn.

Every entry point splits the model (``nnx.split``) and runs a ``jax.jit``-compiled pure
function of ``(graphdef, state, arrays)``: repeated calls with the same shapes reuse the
compiled program, and the functions stay differentiable under ``nnx.grad`` / ``jax.grad``.

``kernels`` (:data:`KERNELS`, one meaning on both backends, see ``diptych.backends.jax.kernels``)
picks the log-prob path (``reference``: full logits; ``chunked``: a ``custom_vjp`` over chunks
of tokens; ``fused``: Pallas) and, only when it resolves to ``fused``, the RMSNorm kernel; every
other mode keeps the plain, transformers-matching RMSNorm.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diptych.backends.jax import kernels as kernels_mod
from diptych.core.mesh import check_remat
from diptych.core.spec import DecoderSpec
from diptych.kernels.checks import check_build_args, check_cache_write, check_kernels_mode

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
KERNELS = kernels_mod.KERNEL_MODES
"""``("auto", "fused", "chunked", "reference")``, the same words as the kernels module and the torch panel."""
LOGPROB_CHUNK_TOKENS = 1024
"""Tokens per chunk in :func:`logprobs` (``chunked``): bounds live logits to ``chunk x vocab`` floats."""

_MASK_VALUE = float(jnp.finfo(jnp.float32).min)
"""Finite, so a fully padded query row softmaxes to a uniform row instead of NaN."""


# -- the pieces, in data-flow order -------------------------------------------------------------
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF order: normalise in float32, cast back to the input dtype, then scale."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


class RMSNorm(nnx.Module):
    """``fused`` (static) routes through the Pallas kernel; otherwise the plain HF-order expression."""

    def __init__(self, dim: int, eps: float, dtype: Any = jnp.float32, fused: bool = False) -> None:
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps, self.fused = eps, fused

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.fused:
            return kernels_mod.rms_norm(x, self.weight[...], self.eps, kernels="fused")
        return rms_norm(x, self.weight[...], self.eps)


class Linear(nnx.Module):
    """``x @ weight.T + bias`` with the weight stored ``[out, in]`` as in the HF checkpoint."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: Any = jnp.float32) -> None:
        self.weight = nnx.Param(jnp.zeros((out_features, in_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.weight[...].T
        return y if self.bias is None else y + self.bias[...]


class Embedding(nnx.Module):
    def __init__(self, num_embeddings: int, dim: int, dtype: Any = jnp.float32) -> None:
        self.weight = nnx.Param(jnp.zeros((num_embeddings, dim), dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], tokens, axis=0)


def rope_inv_freq(spec: DecoderSpec, positions: jax.Array) -> jax.Array:
    """The spec's frequencies (float32); dynamic NTK raises the base from ``max(positions) + 1`` of
    this call, as transformers' ``dynamic_rope_update`` does per forward (and per decode step)."""
    rope = spec.rope()
    if not rope.dynamic:
        return jnp.asarray(rope.inv_freq, jnp.float32)
    factor, max_pos, dim = float(rope.fields["factor"]), float(rope.max_position_embeddings), rope.rotary_dim
    length = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1.0, max_pos)
    base = rope.theta * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.int32).astype(jnp.float32) / dim))


def rope_cos_sin(positions: jax.Array, spec: DecoderSpec, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos / sin ``[B, T, head_dim]`` in float32 times the RoPE type's attention scaling (YaRN's
    factor), cast to the compute dtype, in transformers' order."""
    scaling = spec.rope().attention_scaling
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(spec, positions)
    emb = jnp.concatenate((freqs, freqs), axis=-1)
    return (jnp.cos(emb) * scaling).astype(dtype), (jnp.sin(emb) * scaling).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate((-x2, x1), axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Non-interleaved rotary embedding of ``x [B, heads, T, head_dim]``."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Grouped-query softmax attention.

    ``q [B, H, Tq, D]``, ``k``/``v [B, KVH, S, D]``, ``allowed [B, Tq, S]`` bool. Query head
    ``h`` reads kv head ``h // (H // KVH)`` (HF's ``repeat_kv``), done by a broadcast einsum
    instead of materialising repeated keys.
    """
    b, h, tq, d = q.shape
    kvh = k.shape[1]
    q = q.reshape(b, kvh, h // kvh, tq, d)
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k) * (d**-0.5)
    scores = jnp.where(allowed[:, None, None], scores.astype(jnp.float32), _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, v).reshape(b, h, tq, d)


class Attention(nnx.Module):
    def __init__(self, spec: DecoderSpec, dtype: Any = jnp.float32, fused: bool = False, use_rope: bool = True
                 ) -> None:
        h, bias = spec.hidden_size, spec.attention_bias
        self.num_heads, self.num_kv_heads = spec.num_attention_heads, spec.num_key_value_heads
        self.head_dim, self.use_rope = spec.head_dim, use_rope
        self.q_proj = Linear(h, spec.q_dim, bias, dtype)
        self.k_proj = Linear(h, spec.kv_dim, bias, dtype)
        self.v_proj = Linear(h, spec.kv_dim, bias, dtype)
        self.o_proj = Linear(spec.q_dim, h, spec.o_bias, dtype)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype, fused)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype, fused)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, allowed: jax.Array,
                 cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """``cache = (k_slots, v_slots, write_index)``: write the new k/v there, attend over all slots.

        Returns the output and the updated ``(k_slots, v_slots)`` (None without a cache).
        """
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if self.use_rope:  # SmolLM3's NoPE layers skip it
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_cache = None
        if cache is not None:
            k_slots, v_slots, write_index = cache
            start = (0, 0, write_index, 0)
            k = jax.lax.dynamic_update_slice(k_slots, k.astype(k_slots.dtype), start)
            v = jax.lax.dynamic_update_slice(v_slots, v.astype(v_slots.dtype), start)
            new_cache = (k, v)
        out = attention(q, k, v, allowed)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, t, self.num_heads * self.head_dim)), new_cache


class MLP(nnx.Module):
    def __init__(self, spec: DecoderSpec, dtype: Any = jnp.float32) -> None:
        self.gate_proj = Linear(spec.hidden_size, spec.intermediate_size, False, dtype)
        self.up_proj = Linear(spec.hidden_size, spec.intermediate_size, False, dtype)
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size, False, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, spec: DecoderSpec, dtype: Any = jnp.float32, fused: bool = False, use_rope: bool = True
                 ) -> None:
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, fused)
        self.self_attn = Attention(spec, dtype, fused, use_rope)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, fused)
        self.mlp = MLP(spec, dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, allowed: jax.Array,
                 cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        attn, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, allowed, cache)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), new_cache


class DecoderStack(nnx.Module):
    """HF's ``LlamaModel``: embedding, layers, final norm (named ``model`` in the checkpoint)."""

    def __init__(self, spec: DecoderSpec, dtype: Any = jnp.float32, fused: bool = False) -> None:
        self.embed_tokens = Embedding(spec.vocab_size, spec.hidden_size, dtype)
        self.layers = nnx.List([DecoderLayer(spec, dtype, fused, spec.layer_uses_rope(i))
                                for i in range(spec.num_hidden_layers)])
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, fused)


class Decoder(nnx.Module):
    """HF's ``*ForCausalLM``; ``lm_head`` is absent when tied to ``model.embed_tokens``.

    ``kernels`` is the requested mode (``auto`` stays ``auto``, so a checkpoint written on a GPU
    restores as ``auto`` on a CPU); the norms resolve it once, here, on the default JAX device.
    """

    def __init__(self, spec: DecoderSpec, dtype: str = "float32", kernels: str = "auto") -> None:
        self.spec, self.dtype, self.kernels = spec, dtype, kernels
        jdtype = DTYPES[dtype]
        self.model = DecoderStack(spec, jdtype, kernels_mod.resolve_kernels(kernels) == "fused")
        self.lm_head = None if spec.tie_word_embeddings else Linear(spec.hidden_size, spec.vocab_size, False, jdtype)

    def run(self, tokens: jax.Array, positions: jax.Array, allowed: jax.Array,
            cache: KVCache | None = None, write_index: jax.Array | int = 0) -> tuple[jax.Array, KVCache | None]:
        """Hidden states after the final norm; with ``cache``, new k/v go to slots from ``write_index``."""
        x = self.model.embed_tokens(tokens)
        cos, sin = rope_cos_sin(positions, self.spec, x.dtype)
        ks, vs = [], []
        for i, layer in enumerate(self.model.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i], write_index)
            if cache is None and getattr(self, "remat", "none") == "layer":
                x, new = _remat_layer(layer, x, cos, sin, allowed), None
            else:
                x, new = layer(x, cos, sin, allowed, layer_cache)
            if new is not None:
                ks.append(new[0])
                vs.append(new[1])
        new_cache = None if cache is None else KVCache(jnp.stack(ks), jnp.stack(vs))
        return self.model.norm(x), new_cache


@nnx.remat
def _remat_layer(layer: DecoderLayer, x: jax.Array, cos: jax.Array, sin: jax.Array, allowed: jax.Array,
                 ) -> jax.Array:
    """One decoder layer whose activations are recomputed in the backward (``remat="layer"``), not stored."""
    return layer(x, cos, sin, allowed)[0]


def set_remat(model: Decoder, remat: str) -> Decoder:
    """Activation checkpointing of the decoder layers: ``"layer"`` (``jax.checkpoint`` per layer) or ``"none"``.

    A static attribute, so it is part of the graphdef: a changed mode compiles a new step.
    """
    model.remat = check_remat(remat)
    return model


@partial(jax.tree_util.register_dataclass, data_fields=["k", "v"], meta_fields=[])
class KVCache:
    """Preallocated keys and values, ``[layers, B, kv_heads, max_len, head_dim]`` in the model dtype.

    A pytree, so it passes through ``jax.jit`` and ``lax`` loops; :func:`forward_cached`
    returns a new one (JAX arrays are immutable) instead of writing in place.
    """

    def __init__(self, k: jax.Array, v: jax.Array) -> None:
        self.k, self.v = k, v

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


# -- the module-level API (the facade calls these) ----------------------------------------------
def build(spec: DecoderSpec, weights: dict[str, np.ndarray], dtype: str = "float32", kernels: str = "auto") -> Decoder:
    """A ``Decoder`` holding ``weights`` (validated by name and shape) in ``dtype``.

    The module skeleton is made with ``nnx.eval_shape`` and the weights assigned into its
    state, so building a large model never pays for a throwaway init.
    """
    check_build_args(spec, dtype, kernels, DTYPES, "Pallas")
    spec.validate_weights(weights)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(spec, dtype, kernels)))
    flat = nnx.to_flat_state(abstract)
    values = [jnp.asarray(np.asarray(weights[_hf_name(path)], dtype=np.float32), dtype=DTYPES[dtype])
              for path, _ in flat]
    state = nnx.from_flat_state([(path, var.replace(value)) for (path, var), value in zip(flat, values)])
    return nnx.merge(graphdef, state)


def export(model: Decoder) -> dict[str, np.ndarray]:
    """Canonical float32 weights with HF names (no ``lm_head.weight`` when tied)."""
    return {_hf_name(path): np.array(var[...].astype(jnp.float32))
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def forward(model: Decoder, tokens: Any, attention_mask: Any = None, *, positions: Any = None) -> jax.Array:
    """Logits ``[B, T, V]`` float32 for a left-padded batch."""
    tokens, mask, positions = _inputs(model, tokens, attention_mask, positions)
    graphdef, state = nnx.split(model)
    return _forward_jit(graphdef, state, tokens, mask, positions)


def hidden_states(model: Decoder, tokens: Any, attention_mask: Any = None, *, positions: Any = None) -> jax.Array:
    """``[B, T, H]`` after the final norm, in the model dtype: the seam fused log-prob kernels plug into."""
    tokens, mask, positions = _inputs(model, tokens, attention_mask, positions)
    graphdef, state = nnx.split(model)
    return _hidden_jit(graphdef, state, tokens, mask, positions)


def lm_head_weight(model: Decoder) -> jax.Array:
    """``[V, H]``: the output projection, which is the embedding when tied."""
    return model.model.embed_tokens.weight[...] if model.lm_head is None else model.lm_head.weight[...]


def logprobs(model: Decoder, tokens: Any, attention_mask: Any, targets: Any, temperature: float = 1.0, *,
             kernels: str | None = None) -> jax.Array:
    """``log_softmax(logits / temperature)[targets]`` over the full vocabulary, ``[B, T]`` float32.

    ``kernels`` (default: the model's) picks the path of :func:`diptych.backends.jax.kernels.selective_logprobs`;
    under ``auto`` on CPU that is ``chunked``, so the ``[B, T, V]`` logits never exist at once,
    in the forward or the backward.
    """
    kernels = model.kernels if kernels is None else kernels
    _check_kernels(kernels)
    mode = kernels_mod.resolve_kernels(kernels)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    tokens, mask, positions = _inputs(model, tokens, attention_mask, None)
    targets = _as_int(targets)
    if targets.shape != tokens.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal tokens shape {tuple(tokens.shape)}.")
    graphdef, state = nnx.split(model)
    return _logprobs_jit(graphdef, state, tokens, mask, positions, targets, jnp.float32(temperature), mode)


def _project(h: jax.Array, weight: jax.Array) -> jax.Array:
    """The lm_head matmul in the model dtype, as HF computes it before any upcast."""
    return h @ weight.T


# -- KV cache -----------------------------------------------------------------------------------
def init_cache(model: Decoder, batch_size: int, max_len: int) -> KVCache:
    """Zeroed k/v slots for ``batch_size`` rows of up to ``max_len`` tokens."""
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"init_cache needs batch_size >= 1 and max_len >= 1, got {batch_size} and {max_len}.")
    s = model.spec
    shape = (s.num_hidden_layers, batch_size, s.num_key_value_heads, max_len, s.head_dim)
    dtype = DTYPES[model.dtype]
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def forward_cached(model: Decoder, tokens: Any, positions: Any, cache: KVCache, write_index: Any,
                   key_mask: Any) -> tuple[jax.Array, KVCache]:
    """Write the T new tokens' k/v at slots ``write_index..write_index+T-1`` and return their logits.

    Query ``t`` sits at slot ``write_index + t`` and attends to slots at or before it where
    ``key_mask`` is 1. Prefill: ``write_index = 0``, ``key_mask`` = attention mask padded
    with zeros to ``max_len``; then decode steps with T = 1. ``write_index`` may be a traced
    scalar (one compiled program serves every decode step); only a concrete one is range-checked.
    Called outside a jit, the input cache is donated (updated in place, no full copy per
    step) and must not be used again: keep the returned one.
    """
    tokens, positions, key_mask = _as_tokens(model, tokens), _as_int(positions), _as_mask(key_mask)
    concrete = None if isinstance(write_index, jax.core.Tracer) else int(write_index)
    check_cache_write(tuple(tokens.shape), tuple(positions.shape), tuple(key_mask.shape), cache.k.shape[1],
                      cache.max_len, concrete)
    graphdef, state = nnx.split(model)
    return _forward_cached_jit(graphdef, state, tokens, positions, cache, jnp.asarray(write_index, jnp.int32),
                               key_mask)


# -- compiled pure functions of (graphdef, state, arrays) ---------------------------------------
def causal_allowed(query_slots: jax.Array, key_slots: jax.Array, key_mask: jax.Array,
                   sliding_window: int | None = None) -> jax.Array:
    """``[B, Tq, S]``: key slot at or before the query slot, unmasked, and (Mistral) within the window.

    The window counts slots, as transformers' ``sliding_window_overlay`` does; on a left-padded batch
    a row's real tokens sit in consecutive slots, so that is the same as counting positions.
    """
    ok = key_slots[None, :] <= query_slots[:, None]
    if sliding_window is not None:
        ok = ok & (key_slots[None, :] > query_slots[:, None] - sliding_window)
    return ok[None] & key_mask[:, None, :]


def _causal_allowed(mask: jax.Array, sliding_window: int | None = None) -> jax.Array:
    slots = jnp.arange(mask.shape[1])
    return causal_allowed(slots, slots, mask, sliding_window)


@partial(jax.jit, static_argnums=0)
def _hidden_jit(graphdef: Any, state: Any, tokens: jax.Array, mask: jax.Array, positions: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)
    return model.run(tokens, positions, _causal_allowed(mask, model.spec.sliding_window))[0]


@partial(jax.jit, static_argnums=0)
def _forward_jit(graphdef: Any, state: Any, tokens: jax.Array, mask: jax.Array, positions: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)
    hidden = model.run(tokens, positions, _causal_allowed(mask, model.spec.sliding_window))[0]
    return _project(hidden, lm_head_weight(model)).astype(jnp.float32)


@partial(jax.jit, static_argnums=(0, 7))
def _logprobs_jit(graphdef: Any, state: Any, tokens: jax.Array, mask: jax.Array, positions: jax.Array,
                  targets: jax.Array, temperature: jax.Array, mode: str) -> jax.Array:
    model = nnx.merge(graphdef, state)
    hidden = model.run(tokens, positions, _causal_allowed(mask, model.spec.sliding_window))[0]
    return kernels_mod.selective_logprobs(hidden, lm_head_weight(model), targets, temperature, kernels=mode,
                                          chunk_size=LOGPROB_CHUNK_TOKENS)[0]


@partial(jax.jit, static_argnums=0, donate_argnums=4)
def _forward_cached_jit(graphdef: Any, state: Any, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                        write_index: jax.Array, key_mask: jax.Array) -> tuple[jax.Array, KVCache]:
    model = nnx.merge(graphdef, state)
    t = tokens.shape[1]
    allowed = causal_allowed(write_index + jnp.arange(t), jnp.arange(cache.max_len), key_mask,
                             model.spec.sliding_window)
    hidden, cache = model.run(tokens, positions, allowed, cache, write_index)
    return _project(hidden, lm_head_weight(model)).astype(jnp.float32), cache


# -- input handling -----------------------------------------------------------------------------
def _check_kernels(kernels: Any) -> None:
    check_kernels_mode(kernels, "Pallas")


def _hf_name(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def _as_int(x: Any) -> jax.Array:
    a = x if isinstance(x, jax.Array) else jnp.asarray(np.asarray(x))
    if jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"Expected an integer array, got dtype {a.dtype}.")
    return a.astype(jnp.int32)


def _as_mask(x: Any) -> jax.Array:
    """Any 0/1 array (int, bool or float, as tokenizers return) as a boolean array."""
    a = x if isinstance(x, jax.Array) else jnp.asarray(np.asarray(x))
    return a != 0


def _as_tokens(model: Decoder, tokens: Any) -> jax.Array:
    """Token ids; host (numpy / list) input is range-checked, since an embedding gather would not fail."""
    if not isinstance(tokens, jax.Array):
        host = np.asarray(tokens)
        vocab = model.spec.vocab_size
        if host.size and np.issubdtype(host.dtype, np.integer) and (host.min() < 0 or host.max() >= vocab):
            raise ValueError(f"Token ids must lie in [0, {vocab}) for this model's vocabulary; got ids from "
                             f"{host.min()} to {host.max()}. Check the tokenizer matches the model.")
    return _as_int(tokens)


def _inputs(model: Decoder, tokens: Any, attention_mask: Any, positions: Any) -> tuple[jax.Array, ...]:
    """Tokens, boolean mask and positions; positions default to cumsum(mask) - 1."""
    tokens = _as_tokens(model, tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, time], got shape {tuple(tokens.shape)}.")
    mask = jnp.ones(tokens.shape, bool) if attention_mask is None else _as_mask(attention_mask)
    if mask.shape != tokens.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} must equal tokens shape {tuple(tokens.shape)}.")
    if positions is None:
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1, 0)
    else:
        positions = _as_int(positions)
        if positions.shape != tokens.shape:
            raise ValueError(f"positions shape {tuple(positions.shape)} must equal tokens shape {tuple(tokens.shape)}.")
    return tokens, mask, positions
