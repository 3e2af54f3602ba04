"""The JAX half of the continuous-batching sampler: a KV cache of fixed slots, one row per request.

Each row keeps its tokens at the slots of their positions (slot ``j`` holds position ``j``), so rows of
different lengths decode side by side and a new prompt can enter a free row between decode steps.
``Decoder.run`` writes a step's k/v at one slot for the whole batch; a per-row write position is
had without touching the model's code by letting every row write at a shared scratch slot (the
cache's last) that each row's own mask admits, then scattering that k/v to the row's position. The
attention mask is built here, per row, so Mistral's sliding window counts each row's own positions.

Compilation: one decode program per ``(slots, max_len)`` and one prefill program per prefill width;
the row, the lengths and the weights are traced arguments, so admissions, exits and weight swaps
reuse them. The cache is donated to each call (updated in place). Token choice happens on the host
(:mod:`diptych.rollout.continuous`); ``diptych.backends.torch.continuous`` is the same text in torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diptych.backends.jax import lora
from diptych.backends.jax import model as M


class SlotDecoder:
    """The model as ``(graphdef, state)`` plus ``slots`` rows of KV cache, ``max_len`` positions each.

    The state is copied: a JAX train step donates its buffers, and the sampler must keep the weights of
    the version it was told about until :meth:`load_weights` says otherwise. A LoRA model is taken as a
    plain one holding its merged weights, the form ``export_weights`` hands to :meth:`load_weights`.
    """

    def __init__(self, model: M.Decoder, slots: int, max_len: int) -> None:
        if lora.lora_config(model) is not None:
            model = M.build(model.spec, lora.merged_weights(model), model.dtype, model.kernels)
        self.spec, self.dtype, self.kernels = model.spec, model.dtype, model.kernels
        self.graphdef, state = nnx.split(model)
        self.state = jax.tree.map(jnp.copy, state)
        self.slots, self.max_len = int(slots), int(max_len)
        self.cache = M.init_cache(model, self.slots, self.max_len + 1)  # + the scratch slot

    def prefill(self, row: int, ids: np.ndarray, width: int) -> np.ndarray:
        """Write row ``row``'s k/v for ``ids`` at slots ``0..len(ids)-1``; the last position's logits ``[V]``.

        ``ids`` is right-padded to ``width`` (one compiled program per width); pad positions repeat the
        last real one, so dynamic RoPE sees the same largest position as an unpadded run.
        """
        tok = np.zeros((1, width), np.int32)
        tok[0, :len(ids)] = ids
        logits, self.cache = _prefill(self.graphdef, self.state, self.cache, np.int32(row), tok,
                                      np.int32(len(ids)))
        return np.asarray(logits)

    def copy_row(self, src: int, dst: int) -> None:
        """Row ``dst``'s cache becomes row ``src``'s (a prompt prefilled once serves its repeats)."""
        self.cache = _copy_row(self.cache, np.int32(src), np.int32(dst))

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Feed ``tokens[r]`` at position ``lengths[r]`` of every row; next-token logits ``[slots, V]``."""
        logits, self.cache = _decode(self.graphdef, self.state, self.cache, np.asarray(tokens, np.int32),
                                     np.asarray(lengths, np.int32))
        return np.asarray(logits)

    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """New canonical weights into the same graph, so the compiled programs are reused."""
        graphdef, state = nnx.split(M.build(self.spec, dict(weights), self.dtype, self.kernels))
        if graphdef != self.graphdef:
            raise ValueError("update_weights: these weights build a model of another structure than the sampler's; "
                             "pass backend.export_weights(state) of the model the sampler was built with.")
        self.state = state


def _project(model: M.Decoder, hidden: jax.Array) -> jax.Array:
    """The lm_head matmul in the model dtype, as ``M.forward`` computes it, then float32."""
    return (hidden @ M.lm_head_weight(model).T).astype(jnp.float32)


@partial(jax.jit, static_argnums=0, donate_argnums=2)
def _prefill(graphdef: Any, state: Any, cache: M.KVCache, row: jax.Array, tok: jax.Array, n: jax.Array
             ) -> tuple[jax.Array, M.KVCache]:
    model = nnx.merge(graphdef, state)
    width, slots = tok.shape[1], cache.max_len
    q = jnp.arange(width)
    positions = jnp.minimum(q, n - 1).astype(jnp.int32)[None]
    allowed = M.causal_allowed(q, jnp.arange(slots), jnp.ones((1, slots), bool), model.spec.sliding_window)
    view = M.KVCache(jax.lax.dynamic_slice_in_dim(cache.k, row, 1, axis=1),
                     jax.lax.dynamic_slice_in_dim(cache.v, row, 1, axis=1))
    hidden, view = model.run(tok, positions, allowed, view, 0)
    cache = M.KVCache(jax.lax.dynamic_update_slice_in_dim(cache.k, view.k, row, axis=1),
                      jax.lax.dynamic_update_slice_in_dim(cache.v, view.v, row, axis=1))
    return _project(model, jax.lax.dynamic_index_in_dim(hidden[0], n - 1, axis=0, keepdims=False)), cache


@partial(jax.jit, donate_argnums=0)
def _copy_row(cache: M.KVCache, src: jax.Array, dst: jax.Array) -> M.KVCache:
    def copy(buf: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice_in_dim(buf, jax.lax.dynamic_slice_in_dim(buf, src, 1, axis=1), dst, axis=1)

    return M.KVCache(copy(cache.k), copy(cache.v))


@partial(jax.jit, static_argnums=0, donate_argnums=2)
def _decode(graphdef: Any, state: Any, cache: M.KVCache, tokens: jax.Array, lengths: jax.Array
            ) -> tuple[jax.Array, M.KVCache]:
    model = nnx.merge(graphdef, state)
    scratch = cache.max_len - 1
    keys = jnp.arange(cache.max_len)
    ok = keys[None, :] < lengths[:, None]
    window = model.spec.sliding_window
    if window is not None:
        ok &= keys[None, :] > lengths[:, None] - window
    ok |= keys[None, :] == scratch
    hidden, cache = model.run(tokens[:, None], lengths[:, None], ok[:, None, :], cache, scratch)
    rows = jnp.arange(tokens.shape[0])
    # [layers, rows, kv_heads, slots, head_dim]: row r's new k/v from the scratch slot to slot lengths[r]
    k = cache.k.at[:, rows, :, lengths].set(jnp.moveaxis(cache.k[:, :, :, scratch], 1, 0))
    v = cache.v.at[:, rows, :, lengths].set(jnp.moveaxis(cache.v[:, :, :, scratch], 1, 0))
    return _project(model, hidden[:, 0]), M.KVCache(k, v)
