"""Batched KV-cached generation in JAX: one compiled program per (model structure, shapes, sampling).

Prefill and the whole decode loop (a ``lax.while_loop`` that exits when every row has
stopped) run inside one ``jax.jit``; the model travels as ``nnx.split`` state. Prompt widths
are bucketed to powers of two (at least :data:`MIN_BUCKET`) so a training run compiles a
handful of programs, not one per batch. The token-choice rule is
:mod:`diptych.core.sampling`'s, translated line for line; ``diptych.backends.torch.sampler``
is the same text in torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diptych.backends.jax import model as M
from diptych.core.sampling import (
    Rollout,
    SamplingConfig,
    finished_rollout,
    parity_gumbel,
    prepare_prompts,
)

MIN_BUCKET = 16
"""Smallest prompt width compiled; wider prompts round up to the next power of two."""


def filter_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Temperature, then top-k, top-p, min-p on float32 ``[B, V]``; removed tokens become -inf."""
    x = logits.astype(jnp.float32) / jnp.float32(sampling.temperature)
    neg = jnp.float32(-jnp.inf)
    if sampling.top_k and sampling.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, sampling.top_k)[0][..., -1:]
        x = jnp.where(x < kth, neg, x)
    if sampling.top_p < 1.0:
        p = jax.nn.softmax(x, axis=-1)
        ps = -jnp.sort(-p, axis=-1)
        before = jnp.cumsum(ps, axis=-1) - ps
        keep_n = jnp.sum(before < jnp.float32(sampling.top_p), axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(ps, keep_n - 1, axis=-1)
        x = jnp.where(p < cutoff, neg, x)
    if sampling.min_p > 0.0:
        p = jax.nn.softmax(x, axis=-1)
        x = jnp.where(p < jnp.float32(sampling.min_p) * p.max(-1, keepdims=True), neg, x)
    return x


def choose_tokens(logits: jax.Array, sampling: SamplingConfig, gumbel: jax.Array | None
                  ) -> tuple[jax.Array, jax.Array]:
    """``(tokens [B], full-vocab log-probs [B])``; ``gumbel`` is unused when greedy."""
    logits = logits.astype(jnp.float32)
    if sampling.greedy:
        tok = jnp.argmax(logits, axis=-1)
        lp = jax.nn.log_softmax(logits, axis=-1)
    else:
        tok = jnp.argmax(filter_logits(logits, sampling) + gumbel, axis=-1)
        lp = jax.nn.log_softmax(logits / jnp.float32(sampling.temperature), axis=-1)
    return tok.astype(jnp.int32), jnp.take_along_axis(lp, tok[:, None], -1)[:, 0]


def _stop_hit(out: jax.Array, t: jax.Array, stops: tuple[tuple[int, ...], ...]) -> jax.Array:
    """Rows whose completion ``out[:, :t+1]`` ends with one of ``stops`` (``t`` traced)."""
    hit = jnp.zeros(out.shape[0], bool)
    for s in stops:
        n = len(s)
        if n > out.shape[1]:
            continue
        tail = jax.lax.dynamic_slice_in_dim(out, jnp.maximum(t + 1 - n, 0), n, axis=1)
        hit |= jnp.all(tail == jnp.asarray(s, out.dtype), axis=1) & (t + 1 >= n)
    return hit


@partial(jax.jit, static_argnums=(0, 1))
def _generate_jit(graphdef: Any, sampling: SamplingConfig, state: Any, ptok: jax.Array, pmask: jax.Array,
                  gumbel: jax.Array | None, key: jax.Array) -> tuple[jax.Array, ...]:
    model = nnx.merge(graphdef, state)
    rows, plen = ptok.shape
    steps, pad = sampling.max_new_tokens, sampling.pad_id
    eos = jnp.asarray(sampling.eos_ids or (-1,), jnp.int32)

    cache = M.init_cache(model, rows, plen + steps)
    key_mask = jnp.zeros((rows, plen + steps), bool).at[:, :plen].set(pmask != 0)
    positions = jnp.maximum(jnp.cumsum(pmask, axis=1) - 1, 0)
    logits, cache = M.forward_cached(model, ptok, positions, cache, 0, key_mask)
    next_pos = jnp.sum(pmask, axis=1, dtype=jnp.int32)

    def cond(c: tuple) -> jax.Array:
        t, done = c[0], c[-2]
        return (t < steps) & ~jnp.all(done)

    def body(c: tuple) -> tuple:
        t, logits, cache, key_mask, out, lps, cmask, done, key = c
        g = None
        if not sampling.greedy:
            if gumbel is not None:
                g = jax.lax.dynamic_index_in_dim(gumbel, t, axis=1, keepdims=False)
            else:
                key, sub = jax.random.split(key)
                g = jax.random.gumbel(sub, logits.shape, jnp.float32)
        tok, lp = choose_tokens(logits, sampling, g)
        tok = jnp.where(done, pad, tok)
        out = out.at[:, t].set(tok)
        lps = lps.at[:, t].set(jnp.where(done, 0.0, lp))
        cmask = cmask.at[:, t].set((~done).astype(jnp.int32))
        done = done | jnp.isin(tok, eos) | _stop_hit(out, t, sampling.stop_sequences)
        key_mask = key_mask.at[:, plen + t].set(True)
        logits, cache = M.forward_cached(model, tok[:, None], (next_pos + t)[:, None], cache, plen + t, key_mask)
        return t + 1, logits[:, -1], cache, key_mask, out, lps, cmask, done, key

    init = (
        jnp.int32(0), logits[:, -1], cache, key_mask,
        jnp.full((rows, steps), pad, jnp.int32), jnp.zeros((rows, steps), jnp.float32),
        jnp.zeros((rows, steps), jnp.int32), jnp.zeros(rows, bool), key,
    )
    c = jax.lax.while_loop(cond, body, init)
    return c[4], c[5], c[6], c[7]


def generate(
    model: M.Decoder,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    *,
    noise: np.ndarray | None = None,
    seed: int | None = None,
) -> Rollout:
    """Sample ``sampling.n`` completions per prompt; see :class:`diptych.core.sampling.Rollout`.

    ``noise``: parity-mode uniforms ``[len(prompts) * n, max_new_tokens, vocab]``; otherwise
    Gumbel noise comes from ``jax.random`` keyed by ``seed`` (random when None).
    """
    spec = model.spec
    sampling = sampling.resolve(spec)
    ptok, pmask = prepare_prompts(prompts, sampling, spec, bucket=MIN_BUCKET)
    gumbel = parity_gumbel(noise, ptok.shape[0], sampling, spec.vocab_size)
    gumbel = None if gumbel is None else jnp.asarray(gumbel)
    if seed is None:
        seed = int(np.random.default_rng().integers(1 << 31))
    graphdef, state = nnx.split(model)
    static = _static_config(sampling)
    out, lps, cmask, done = _generate_jit(graphdef, static, state, jnp.asarray(ptok), jnp.asarray(pmask),
                                          gumbel, jax.random.key(int(seed)))
    return finished_rollout(ptok, pmask, np.asarray(out), np.asarray(cmask), np.asarray(lps), np.asarray(done))


def _static_config(sampling: SamplingConfig) -> SamplingConfig:
    """The fields that shape the program; ``n`` only changes the batch."""
    return replace(sampling, n=1)
