"""The JAX primitives of the parallel sampler (``diptych.recurrent.parallel``): one jitted call per outer step.

An outer step embeds the window's tokens, runs the prelude, one core iteration and the readout on the window
only, and returns its relative latent changes and logits. Every layer's keys and values live in a per-rollout
cache over the whole buffer: the window writes its own, and attends to the cache for the positions left of it,
which are frozen (their states and tokens final, so their keys and values are those of the step in which they
were last inside the window). Without it each step paid a full-buffer prelude, iteration and readout in four
dispatches and three device-to-host copies, and the loop was no faster than the KV-cached sequential sampler.
The state is donated (updated in place); a jitted step compiles once per batch shape and window width
(``diptych.recurrent.parallel.window_width``: a handful per rollout shape).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diptych.backends.jax.recurrent_layers import (
    Params,
    RecurrentLM,
    _attend,
    _block_out,
    _head,
    _linear,
    _qkv,
    _rms_norm,
    _rope_tables,
)
from diptych.core.recurrent_spec import RecurrentSpec
from diptych.recurrent.parallel import parallel_generate


def _layers(spec: RecurrentSpec) -> tuple[list[str], list[str], list[str]]:
    return ([f"transformer.prelude.{i}." for i in range(spec.n_layers_in_prelude)],
            [f"transformer.core_block.{i}." for i in range(spec.n_layers_in_recurrent_block)],
            [f"transformer.coda.{i}." for i in range(spec.n_layers_in_coda)])


def _put(buffer: jax.Array, window: jax.Array, start: jax.Array) -> jax.Array:
    """Write each row's window into its buffer row at its own start: a gather and a select (a vmapped
    ``dynamic_update_slice`` lowers to a scatter, which XLA on CPU runs element by element: 10x slower)."""
    B, W, width = buffer.shape[0], buffer.shape[1], window.shape[1]
    if B == 1:  # one row: an in-place slice update (the buffer is donated), no full-buffer gather and select
        return jax.lax.dynamic_update_slice_in_dim(buffer, window, start[0], axis=1)
    rel = jnp.arange(W)[None] - start[:, None]
    lanes = (B, W) + (1,) * (buffer.ndim - 2)
    full = jnp.take_along_axis(window, jnp.clip(rel, 0, width - 1).reshape(lanes), axis=1)
    return jnp.where(((rel >= 0) & (rel < width)).reshape(lanes), full, buffer)


def _take(buffer: jax.Array, start: jax.Array, width: int) -> jax.Array:
    if buffer.shape[0] == 1:
        return jax.lax.dynamic_slice_in_dim(buffer, start[0], width, axis=1)
    return jax.vmap(lambda b, s: jax.lax.dynamic_slice_in_dim(b, s, width, axis=0))(buffer, start)


@partial(jax.jit, static_argnames=("tree", "spec", "width"), donate_argnums=(3,))
def _advance(leaves: tuple, tree: Any, spec: RecurrentSpec, state, host: jax.Array, width: int):
    """``host`` = [tokens | mask | keep | RoPE positions | start] (one transfer in; the positions are a cumulative
    sum, which XLA on CPU lowers to ~30 kernels); returns the state and [logits | change]. The parameters come as
    their flattened leaves (a tuple flattens faster per call than the dict, whose keys are sorted every time)."""
    P: Params = jax.tree_util.tree_unflatten(tree, leaves)
    x, kv = state
    W = x.shape[1]
    tokens, mask, keep = host[:, :W], host[:, W: 2 * W], host[:, 2 * W: 3 * W] > 0
    positions, start = host[:, 3 * W: 4 * W], host[:, 4 * W]
    where = start[:, None] + jnp.arange(width)[None]  # [B, width] buffer positions of the window
    rope = _rope_tables(_take(positions, start, width), spec.head_dim, spec.rope_base)
    allowed = (jnp.arange(W)[None, None, :] <= where[:, :, None]) & (mask[:, None, :] > 0)  # [B, width, W]
    new_kv = []

    def block(p: str, h: jax.Array) -> jax.Array:
        q, k, v = _qkv(P, p, spec, h, rope)
        ck, cv = kv[len(new_kv)]
        ck, cv = _put(ck, k, start), _put(cv, v, start)
        new_kv.append((ck, cv))
        return _block_out(P, p, spec, h, _attend(q, ck, cv, allowed))

    prelude, core, coda = _layers(spec)
    wte = P["transformer.wte.weight"]
    e = wte[_take(tokens, start, width)] * jnp.asarray(spec.embed_scale, wte.dtype)
    for p in prelude:
        e = block(p, e)
    old = _take(x, start, width)
    h = _linear(P, "transformer.adapter.weight", jnp.concatenate([old, e], axis=-1))
    if "transformer.adapter.bias" in P:
        h = h + P["transformer.adapter.bias"]
    for p in core:
        h = block(p, h)
    new = jnp.where(_take(keep, start, width)[..., None], old, h)
    diff, ref = (new - old).astype(jnp.float32), old.astype(jnp.float32)
    change = jnp.linalg.norm(diff, axis=-1) / jnp.maximum(jnp.linalg.norm(ref, axis=-1), 1e-30)
    h = _rms_norm(new, P["transformer.ln_f.weight"], spec.norm_eps)
    for p in coda:
        h = block(p, h)
    h = _rms_norm(h, P["transformer.ln_f.weight"], spec.norm_eps)
    logits = (h @ _head(P, spec)[: spec.vocab_size].T).astype(jnp.float32)
    return (_put(x, new, start), tuple(new_kv)), jnp.concatenate([logits, change[..., None]], axis=-1)


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _begin(spec: RecurrentSpec, rows: int, width: int, dtype: Any):
    """Zero latents and K/V caches in one dispatch (eight separate ``jnp.zeros`` cost more than a short rollout's
    outer step); the outputs are distinct buffers, as donation needs."""
    shape = (rows, width, spec.num_key_value_heads, spec.head_dim)
    n = sum(len(names) for names in _layers(spec))
    kv = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(n))
    return jnp.zeros((rows, width, spec.n_embd), dtype), kv


class ParallelOps:
    """``begin`` and ``advance`` of ``diptych.recurrent.parallel`` on a JAX recurrent model."""

    def __init__(self, model: RecurrentLM) -> None:
        self.model, self.spec = model, model.spec
        self.P = model.param_dict()
        leaves, self._tree = jax.tree_util.tree_flatten(self.P)
        self._leaves = tuple(leaves)

    def begin(self, rows: int, width: int):
        return _begin(self.spec, rows, width, self.P["transformer.wte.weight"].dtype)

    def advance(self, state, tokens: np.ndarray, mask: np.ndarray, keep: np.ndarray, start: np.ndarray,
                width: int) -> tuple[Any, np.ndarray, np.ndarray]:
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        host = np.concatenate([tokens, mask, keep, positions, np.asarray(start)[:, None]], axis=1, dtype=np.int32)
        state, out = _advance(self._leaves, self._tree, self.spec, state, host, int(width))
        out = np.asarray(out)
        return state, out[..., -1], out[..., :-1]


def generate(model: RecurrentLM, prompts: Any, sampling: Any, **kw: Any) -> Any:
    """Parallel sampling on a JAX recurrent model; see ``diptych.recurrent.parallel.parallel_generate``."""
    return parallel_generate(ParallelOps(model), prompts, sampling, **kw)
