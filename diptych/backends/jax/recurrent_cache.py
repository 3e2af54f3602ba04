"""KV-cached decoding of recurrent-depth models in JAX: prefill once, then one position per token.

The cache is a dict of preallocated buffers ``[..., B, T_max, kv_heads, head_dim]``: one slot per
prelude layer, one per (core layer, iteration) and one per coda layer, plus the key-validity
mask (left padding and finished rows are never attended) and each row's next RoPE position.
Every write is an index update at a traced column or iteration, so each primitive compiles
once per rollout shape, not per token; the core buffers are written once per token (all its
iterations' K/V at its column), never inside the loop over iterations, so a token costs what its
iterations read, not a copy of the whole cache per iteration (``_core``). A token that exited at
depth d < num_steps gets its slots d+1..num_steps filled with its slot d (Huginn's "latest"
fallback), row by row.
Mirrors ``diptych.backends.torch.recurrent_cache``; the loop that drives it is
``diptych.recurrent.generate``.
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
    _qkv,
    _rms_norm,
    _rope_tables,
)
from diptych.core.recurrent_spec import RecurrentSpec

Cache = dict[str, jax.Array]


def init_cache(spec: RecurrentSpec, rows: int, capacity: int, steps: int, dtype: Any) -> Cache:
    """Zeroed buffers for ``rows`` sequences of up to ``capacity`` tokens at up to ``steps`` iterations."""
    kv = (rows, capacity, spec.num_key_value_heads, spec.head_dim)
    pre, core, coda = spec.n_layers_in_prelude, spec.n_layers_in_recurrent_block, spec.n_layers_in_coda
    return {
        "pre_k": jnp.zeros((pre, *kv), dtype), "pre_v": jnp.zeros((pre, *kv), dtype),
        "core_k": jnp.zeros((core, steps, *kv), dtype), "core_v": jnp.zeros((core, steps, *kv), dtype),
        "coda_k": jnp.zeros((coda, *kv), dtype), "coda_v": jnp.zeros((coda, *kv), dtype),
        "valid": jnp.zeros((rows, capacity), bool), "count": jnp.zeros((rows,), jnp.int32),
    }


def _cached_block(P: Params, p: str, spec: RecurrentSpec, x: jax.Array, rope, kb: jax.Array, vb: jax.Array,
                  col: Any, allowed: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """A sandwich block whose new K/V are written at ``col`` before its queries read the whole buffer; returns
    the output, both buffers and the new K/V alone (``_core`` writes those into the cache itself)."""
    q, k, v = _qkv(P, p, spec, x, rope)
    k, v = k.astype(kb.dtype), v.astype(vb.dtype)
    kb = jax.lax.dynamic_update_slice(kb, k, (0, col, 0, 0))
    vb = jax.lax.dynamic_update_slice(vb, v, (0, col, 0, 0))
    return _block_out(P, p, spec, x, _attend(q, kb, vb, allowed)), kb, vb, k, v


def _stack(P: Params, spec: RecurrentSpec, name: str, x: jax.Array, rope, ck: jax.Array, cv: jax.Array, col: Any,
           allowed: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    for layer in range(ck.shape[0]):
        x, kb, vb, _, _ = _cached_block(P, f"transformer.{name}.{layer}.", spec, x, rope, ck[layer], cv[layer], col,
                                        allowed)
        ck, cv = ck.at[layer].set(kb), cv.at[layer].set(vb)
    return x, ck, cv


def _core(P: Params, spec: RecurrentSpec, x: jax.Array, e: jax.Array, rope, ck: jax.Array, cv: jax.Array, it: Any,
          col: Any, allowed: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Iteration ``it`` (0-based) of the core block against the (layer, it) slots, which it reads but never writes.

    Returns the new state and the new positions' K/V ``[core layers, B, S, kv, hd]`` for the caller to write
    once. Writing into the cache here, inside the loop over iterations (or once per ``_step`` call), made XLA
    on CPU copy both whole core buffers every iteration (each ``[core, steps, B, T, kv, hd]``), so a token
    cost O(steps^2 * B * T): 19x batch 1's time at batch 8 and depth 64 (``_fixed`` at batch 8: 2x the
    core buffer's bytes in temporaries, tests/recurrent/test_jax_recurrent_compiles.py).
    """
    x = jnp.concatenate([x, e], axis=-1) @ P["transformer.adapter.weight"].T
    if "transformer.adapter.bias" in P:
        x = x + P["transformer.adapter.bias"]
    ks, vs = [], []
    for layer in range(ck.shape[0]):
        kb, vb = (jax.lax.dynamic_index_in_dim(c[layer], it, keepdims=False) for c in (ck, cv))
        x, _, _, k, v = _cached_block(P, f"transformer.core_block.{layer}.", spec, x, rope, kb, vb, col, allowed)
        ks.append(k)
        vs.append(v)
    return x, jnp.stack(ks), jnp.stack(vs)


def _core_loop(P: Params, spec: RecurrentSpec, x: jax.Array, e: jax.Array, rope, cache: Cache, col: Any,
               allowed: jax.Array, frozen: jax.Array | None = None) -> tuple[jax.Array, Cache]:
    """Every iteration of the core block (``frozen`` rows keep their state), then one write of all the new K/V.

    The loop only reads the core buffers; its per-iteration K/V come out stacked (``lax.scan``) and go in
    with one ``dynamic_update_slice`` at column ``col``, in place on the donated cache.
    """
    ck, cv = cache["core_k"], cache["core_v"]

    def body(x, it):
        new, k, v = _core(P, spec, x, e, rope, ck, cv, it, col, allowed)
        if frozen is not None:
            new = jnp.where(frozen[:, None, None], x, new)
        return new, (k, v)

    x, (ks, vs) = jax.lax.scan(body, x, jnp.arange(ck.shape[1]))  # ks: [steps, core, B, S, kv, hd]
    start = (0, 0, 0, col, 0, 0)
    return x, {**cache, "core_k": jax.lax.dynamic_update_slice(ck, jnp.swapaxes(ks, 0, 1), start),
               "core_v": jax.lax.dynamic_update_slice(cv, jnp.swapaxes(vs, 0, 1), start)}


def _readout(P: Params, spec: RecurrentSpec, cache: Cache, x: jax.Array, rope, col: Any,
             allowed: jax.Array) -> tuple[Cache, jax.Array]:
    """ln_f, the coda (its K/V written at ``col``), ln_f, head: float32 logits of the last position."""
    h = _rms_norm(x, P["transformer.ln_f.weight"], spec.norm_eps)
    h, dk, dv = _stack(P, spec, "coda", h, rope, cache["coda_k"], cache["coda_v"], col, allowed)
    h = _rms_norm(h[:, -1], P["transformer.ln_f.weight"], spec.norm_eps)
    return {**cache, "coda_k": dk, "coda_v": dv}, (h @ _head(P, spec).T).astype(jnp.float32)


def _embed(P: Params, spec: RecurrentSpec, tokens: jax.Array) -> jax.Array:
    wte = P["transformer.wte.weight"]
    return wte[tokens] * jnp.asarray(spec.embed_scale, wte.dtype)


@partial(jax.jit, static_argnames=("spec",), donate_argnames=("cache",))
def _prefill(P: Params, spec: RecurrentSpec, cache: Cache, tokens: jax.Array, mask: jax.Array, s0: jax.Array):
    S, T = tokens.shape[1], cache["valid"].shape[1]
    rope = _rope_tables(jnp.clip(jnp.cumsum(mask, -1) - 1, 0, None), spec.head_dim, spec.rope_base)
    valid = cache["valid"].at[:, :S].set(mask > 0)
    allowed = (jnp.arange(T)[None, :] <= jnp.arange(S)[:, None])[None] & valid[:, None, :]
    e, pk, pv = _stack(P, spec, "prelude", _embed(P, spec, tokens), rope, cache["pre_k"], cache["pre_v"], 0, allowed)

    x, cache = _core_loop(P, spec, s0.astype(e.dtype), e, rope, cache, 0, allowed)
    cache = {**cache, "pre_k": pk, "pre_v": pv, "valid": valid, "count": mask.sum(-1).astype(jnp.int32)}
    cache, logits = _readout(P, spec, cache, x, rope, 0, allowed)
    return cache, x[:, -1:], logits


@partial(jax.jit, static_argnames=("spec",), donate_argnames=("cache",))
def _feed(P: Params, spec: RecurrentSpec, cache: Cache, tokens: jax.Array, valid: jax.Array, col: jax.Array):
    """One new position per row at column ``col``: its RoPE position is the row's count of real tokens."""
    rope = _rope_tables(cache["count"][:, None], spec.head_dim, spec.rope_base)
    vbuf = jax.lax.dynamic_update_slice(cache["valid"], valid[:, None], (0, col))
    allowed = (vbuf & (jnp.arange(vbuf.shape[1]) <= col)[None])[:, None, :]
    e, pk, pv = _stack(P, spec, "prelude", _embed(P, spec, tokens[:, None]), rope, cache["pre_k"], cache["pre_v"],
                       col, allowed)
    cache = {**cache, "pre_k": pk, "pre_v": pv, "valid": vbuf, "count": cache["count"] + valid.astype(jnp.int32)}
    return cache, (e, rope, allowed)


@partial(jax.jit, static_argnames=("spec",), donate_argnames=("cols",))
def _step(P: Params, spec: RecurrentSpec, cache: Cache, cols: tuple[jax.Array, jax.Array], ctx, x: jax.Array,
          it: jax.Array, col: jax.Array):
    """One iteration (adaptive depth): reads the cache, writes its K/V into the token's own small ``cols``
    buffers ``[core, steps, B, 1, kv, hd]``; ``_commit`` moves them into the cache once the token is done."""
    e, rope, allowed = ctx
    x, k, v = _core(P, spec, x, e, rope, cache["core_k"], cache["core_v"], it, col, allowed)
    start = (0, it, 0, 0, 0, 0)
    return (jax.lax.dynamic_update_slice(cols[0], k[:, None], start),
            jax.lax.dynamic_update_slice(cols[1], v[:, None], start)), x


@partial(jax.jit, static_argnames=("spec",), donate_argnames=("cache",))
def _logits(P: Params, spec: RecurrentSpec, cache: Cache, ctx, x: jax.Array, col: jax.Array):
    _, rope, allowed = ctx
    return _readout(P, spec, cache, x, rope, col, allowed)


@partial(jax.jit, static_argnames=("spec",), donate_argnames=("cache",))
def _fixed(P: Params, spec: RecurrentSpec, cache: Cache, ctx, x: jax.Array, frozen: jax.Array, col: jax.Array):
    """Every iteration and the readout of one token in one call (fixed depth: no host decision in between)."""
    e, rope, allowed = ctx
    x, cache = _core_loop(P, spec, x, e, rope, cache, col, allowed, frozen)
    cache, logits = _readout(P, spec, cache, x, rope, col, allowed)
    return cache, x, logits


@partial(jax.jit, donate_argnames=("cache",))
def _commit(cache: Cache, cols: tuple[jax.Array, jax.Array], used: jax.Array, col: jax.Array) -> Cache:
    """Write an adaptive-depth token's K/V at ``col``: slots after each row's exit depth take the entry of its
    last iteration (the "latest" fallback); slots no iteration reached stay zero, as they were."""
    steps, rows = cache["core_k"].shape[1], used.shape[0]
    src = jnp.minimum(jnp.arange(steps)[:, None], used[None, :] - 1)  # [steps, B]
    out = dict(cache)
    for name, c in zip(("core_k", "core_v"), cols):
        out[name] = jax.lax.dynamic_update_slice(cache[name], c[:, src, jnp.arange(rows)[None, :]],
                                                 (0, 0, 0, col, 0, 0))
    return out


class _Token:
    """One fed position: its arrays, its column, how many iterations it has run, and (adaptive depth) the
    K/V of those iterations, not yet in the cache."""

    def __init__(self, arrays: Any, col: int) -> None:
        self.arrays, self.col, self.it = arrays, col, 0
        self.cols: tuple[jax.Array, jax.Array] | None = None


def _bucket(n: int, least: int) -> int:
    return max(least, 1 << max(n - 1, 0).bit_length())


class Decoder:
    """The cached primitives ``diptych.recurrent.generate`` drives (numpy at the boundary).

    The prompt is left-padded (masked) to a power-of-two width and the cache rounded up to a
    multiple of 16 columns, so rollouts of similar sizes reuse one compilation.
    """

    def __init__(self, model: RecurrentLM, rows: int, capacity: int, steps: int) -> None:
        self.P, self.spec = model.param_dict(), model.spec
        self.dtype = self.P["transformer.wte.weight"].dtype
        self.rows, self.steps, self.capacity, self.col = rows, steps, capacity, 0
        self.cache = None

    def prefill(self, tokens: np.ndarray, mask: np.ndarray, s0: np.ndarray) -> tuple[np.ndarray, jax.Array]:
        """The prompt at full depth (no exit): (last-position logits, last-position final state [B, 1, H])."""
        width = tokens.shape[1]
        lead = _bucket(width, 8) - width
        self.capacity = lead + width + -(-(self.capacity - width) // 16) * 16
        self.cache = init_cache(self.spec, self.rows, self.capacity, self.steps, self.dtype)
        pad = ((0, 0), (lead, 0))
        self.cache, final, logits = _prefill(
            self.P, self.spec, self.cache, jnp.asarray(np.pad(tokens, pad), jnp.int32),
            jnp.asarray(np.pad(mask, pad), jnp.int32), jnp.asarray(np.pad(s0, (*pad, (0, 0))), self.dtype))
        self.col = lead + width
        return np.asarray(logits), final

    def feed(self, tokens: np.ndarray, valid: np.ndarray) -> _Token:
        if self.col >= self.capacity:
            raise ValueError(f"KV cache is full ({self.capacity} columns); size it for prompt + max_new_tokens.")
        self.cache, arrays = _feed(self.P, self.spec, self.cache, jnp.asarray(tokens, jnp.int32),
                                   jnp.asarray(valid, bool), jnp.int32(self.col))
        return _Token(arrays, self.col)

    def init(self, ctx: _Token, s0: np.ndarray) -> jax.Array:
        return jnp.asarray(s0, self.dtype)

    def step(self, ctx: _Token, x: jax.Array) -> jax.Array:
        if ctx.cols is None:
            core = self.cache["core_k"]
            shape = (core.shape[0], self.steps, self.rows, 1, *core.shape[4:])
            ctx.cols = (jnp.zeros(shape, core.dtype), jnp.zeros(shape, core.dtype))
        ctx.cols, x = _step(self.P, self.spec, self.cache, ctx.cols, ctx.arrays, x, jnp.int32(ctx.it),
                            jnp.int32(ctx.col))
        ctx.it += 1
        return x

    def logits_last(self, ctx: _Token, x: jax.Array) -> np.ndarray:
        self.cache, logits = _logits(self.P, self.spec, self.cache, ctx.arrays, x, jnp.int32(ctx.col))
        return np.asarray(logits)

    def run_fixed(self, ctx: _Token, x: jax.Array, frozen: np.ndarray) -> tuple[jax.Array, np.ndarray]:
        """All ``steps`` iterations and the logits in one compiled call; ``frozen`` rows keep their state."""
        self.cache, x, logits = _fixed(self.P, self.spec, self.cache, ctx.arrays, x, jnp.asarray(frozen),
                                       jnp.int32(ctx.col))
        ctx.it = self.steps
        return x, np.asarray(logits)

    def latent_last(self, x: jax.Array) -> np.ndarray:
        return np.asarray(x[:, -1].astype(jnp.float32))

    def select(self, keep: np.ndarray, new: jax.Array, old: jax.Array) -> jax.Array:
        return jnp.where(jnp.asarray(keep)[:, None, None], old, new)

    def finish(self, ctx: _Token, used: np.ndarray) -> None:
        """Write the token's iterations (``step``) into the cache, with the slots a row skipped by exiting
        early filled, then move to the next column (``run_fixed`` has written its own)."""
        if ctx.cols is not None:
            self.cache = _commit(self.cache, ctx.cols, jnp.asarray(used, jnp.int32), jnp.int32(ctx.col))
            ctx.cols = None
        self.col = ctx.col + 1
