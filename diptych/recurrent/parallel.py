"""A batched parallel sampler for recurrent-depth models (diffusion-forcing style, after Geiping et al.,
arXiv 2510.14961), written once for both backends.

The sequential sampler gives every new token ``r`` iterations before the next one can start. Here every
position of the sequence iterates at once: each outer step runs ONE core iteration over the whole buffer
(prompt and drafted positions), reads every position out, redrafts each drafted token from its left
neighbour's current state, and drafts one new position, which starts from the initial state with fewer
iterations done than the positions to its left and is refined as later positions are drafted.

A position *freezes* once its latent state has converged (relative change ``< tol``) or it reached
``max_steps`` iterations, and only after every position to its left has frozen (its fixed point depends on
theirs). The token after a frozen position is final. Since the recurrence's fixed point given a prefix does
not depend on the order in which the positions were iterated, run to convergence the greedy tokens equal the
sequential sampler's run to convergence (``tests/recurrent/test_parallel_sampler.py``). Each row has its own
frontier, iteration counts and stop, and rows never interact (left padding is masked), so a padded batch
gives every row what it would get alone.

Cost: ~``max_new + convergence depth`` outer steps, each a full-buffer iteration without a KV cache, against
``max_new x depth`` one-position iterations for the sequential sampler; which wins depends on the hardware
(``benchmarks/recurrent_parallel.py``).

Backend primitives (``ops``): ``prelude(tokens, mask)``, ``init(ctx, None)``, ``step(ctx, x)``,
``logits_all(ctx, x) -> [B, W, V]`` numpy, ``latents(x) -> [B, W, H]`` numpy and ``keep(frozen, new, old)``
(``frozen`` a ``[B, W]`` bool numpy array: where it is set the old state stays).
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from diptych.core.sampling import (
    Rollout,
    SamplingConfig,
    check_noise,
    choose_tokens,
    gumbel_from_uniform,
    prepare_prompts,
    stop_matches,
)


def parallel_generate(ops: Any, prompts: Any, sampling: SamplingConfig, *, num_steps: int | None = None,
                      tol: float = 1e-5, window: int | None = None, noise: np.ndarray | None = None,
                      seed: int | None = None) -> Rollout:
    """Sample completions in parallel across positions; ``extras``: ``depth`` (iterations of the position each
    token was read from), ``outer_steps`` (full-buffer iterations run) and ``mean_depth``.

    ``num_steps`` caps each position's iterations (default: the spec's mean recurrence); ``tol`` is the relative
    latent change under which a position has converged; ``window`` caps the drafted-but-not-final positions per
    row (default: no cap).
    """
    spec = ops.spec
    max_steps = int(spec.mean_recurrence if num_steps is None else num_steps)
    if max_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    if not tol > 0:
        raise ValueError(f"tol must be > 0 (the relative latent change at which a position has converged), got {tol}.")
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be >= 1 drafted positions (or None for no cap), got {window}.")
    if not isinstance(sampling, SamplingConfig):
        raise TypeError("sampling must be a diptych.core.sampling.SamplingConfig.")
    sampling = sampling.resolve(spec)
    ptok, pmask = prepare_prompts(prompts, sampling, spec)
    rows, P = ptok.shape
    max_new, pad = sampling.max_new_tokens, sampling.pad_id
    gumbel = None if noise is None else gumbel_from_uniform(check_noise(noise, rows, sampling, spec.vocab_size))
    rng = np.random.default_rng(seed)
    eos = np.asarray(sampling.eos_ids or (-1,))
    W = P + max_new
    cap = max_new if window is None else int(window)

    tokens = np.concatenate([ptok, np.full((rows, max_new), pad, np.int32)], axis=1)
    out = np.full((rows, max_new), pad, np.int32)
    cmask = np.zeros((rows, max_new), np.int32)
    lps = np.zeros((rows, max_new), np.float32)
    depth = np.zeros((rows, max_new), np.int32)
    done = np.zeros(rows, bool)
    stopped = np.zeros(rows, bool)  # by a stop token or sequence (the rest are truncated at max_new)
    final = np.zeros(rows, np.int64)  # tokens of each row that are final
    drafted = np.ones(rows, np.int64)  # generated positions in the buffer (token 0 is read from position P - 1)
    iters = np.zeros((rows, W), np.int64)
    frozen = np.zeros((rows, W), bool)
    frozen[:, :P] = pmask == 0  # left padding never iterates
    ctx = ops.prelude(tokens, _mask(pmask, drafted, max_new))
    x = ops.init(ctx, None)
    prev = ops.latents(x)
    steps = 0
    while not done.all():
        steps += 1
        live = _live(pmask, drafted, max_new) & ~done[:, None]
        x = ops.keep(frozen | ~live, ops.step(ctx, x), x)
        cur = ops.latents(x)
        moving = live & ~frozen
        iters[moving] += 1
        change = np.linalg.norm(cur - prev, axis=-1) / np.maximum(np.linalg.norm(prev, axis=-1), 1e-30)
        converged = (change < tol) | (iters >= max_steps)
        prev = cur
        # freeze left to right: a position freezes once converged, its own token final (a drafted token may still
        # change its embedding) and every live position to its left frozen
        token_final = np.concatenate([np.ones((rows, P), bool), np.arange(max_new)[None, :] < final[:, None]], 1)
        ok = np.cumprod(np.where(live, frozen | (converged & token_final), True), axis=1).astype(bool)
        frozen |= ok & live
        logits = ops.logits_all(ctx, x)
        changed = False
        for r in np.flatnonzero(~done):
            for t in range(int(final[r]), int(drafted[r])):
                src = P + t - 1  # the position whose state predicts token t
                g = None if gumbel is None else gumbel[r: r + 1, t]
                tok, lp = choose_tokens(logits[r: r + 1, src, : spec.vocab_size], sampling, g, rng)
                if tokens[r, P + t] != tok[0]:
                    tokens[r, P + t] = tok[0]
                    changed = True
                if frozen[r, src] and t == final[r]:
                    out[r, t], lps[r, t], cmask[r, t], depth[r, t] = tok[0], lp[0], 1, iters[r, src]
                    final[r] += 1
                    if np.isin(tok[0], eos) or stop_matches(out[r: r + 1, : t + 1], t + 1,
                                                            sampling.stop_sequences)[0]:
                        done[r] = stopped[r] = True
                    if final[r] == max_new:
                        done[r] = True
            if not done[r] and drafted[r] < max_new and drafted[r] - final[r] < cap:
                drafted[r] += 1  # a new position, from the initial state, behind its neighbours
                changed = True
        if changed and not done.all():
            ctx = _refresh(ops, ctx, tokens, pmask, drafted, max_new)
        if steps > (max_new + 1) * max_steps + 1:  # cannot happen: every position freezes by max_steps
            raise RuntimeError("parallel sampler did not finish; this is a bug.")
    roll = Rollout(ptok, pmask, out, cmask, lps, cmask.sum(1).astype(np.int32), ~stopped)
    roll.extras["depth"] = depth
    live = cmask > 0
    roll.extras["mean_depth"] = float(depth[live].mean()) if live.any() else 0.0
    roll.extras["outer_steps"] = steps
    return roll


def _mask(pmask: np.ndarray, drafted: np.ndarray, max_new: int) -> np.ndarray:
    gen = (np.arange(max_new)[None, :] < drafted[:, None]).astype(np.int32)
    return np.concatenate([pmask.astype(np.int32), gen], axis=1)


def _live(pmask: np.ndarray, drafted: np.ndarray, max_new: int) -> np.ndarray:
    """Positions that iterate: real prompt tokens and the drafted positions (the last drafted token's own
    position only predicts a token beyond the draft, but it iterates so the next draft starts warm)."""
    return _mask(pmask, drafted, max_new) > 0


def _refresh(ops: Any, ctx: Any, tokens: np.ndarray, pmask: np.ndarray, drafted: np.ndarray, max_new: int) -> Any:
    """The prelude over the new drafts: the re-injected embedding follows the tokens; states carry on."""
    return ops.prelude(tokens, _mask(pmask, drafted, max_new))


def parallel_ops(ops: Any) -> Any:
    """The parallel primitives for the model behind a backend's sequential ``ops`` (its ``parallel()`` when it
    has one, else ``ParallelOps`` of the sibling ``recurrent_parallel`` module of the backend package)."""
    if hasattr(ops, "parallel"):
        return ops.parallel()
    package = type(ops).__module__.rsplit(".", 1)[0]
    return importlib.import_module(package + ".recurrent_parallel").ParallelOps(ops.model)
