"""A batched parallel sampler for recurrent-depth models (diffusion-forcing style, after Geiping et al.,
arXiv 2510.14961), written once for both backends.

The sequential sampler gives every new token ``r`` iterations before the next one can start. Here every
position of the sequence iterates at once: each outer step runs ONE core iteration over the positions still
moving (prompt and drafted positions), reads them out, redrafts each drafted token from its left neighbour's
current state, and drafts one new position, which starts from the initial state with fewer iterations done
than the positions to its left and is refined as later positions are drafted.

A position *freezes* once its latent state has converged (relative change ``< tol``) or it reached
``max_steps`` iterations, and only after every position to its left has frozen (its fixed point depends on
theirs). The token after a frozen position is final. Since the recurrence's fixed point given a prefix does
not depend on the order in which the positions were iterated, run to convergence the greedy tokens equal the
sequential sampler's run to convergence (``tests/recurrent/test_parallel_sampler.py``). Each row has its own
frontier, iteration counts and stop, and rows never interact (left padding is masked), so a padded batch
gives every row what it would get alone.

Cost: ~``max_new + convergence depth`` outer steps against ``max_new x depth`` one-position iterations for
the sequential sampler. An outer step only needs a *window* of each row: from its frontier (the first position
not frozen) to its last drafted position, about the convergence depth wide, rounded up to one of a few widths
(:func:`window_width`) so that a compiled backend sees few shapes. Left of the frontier everything is final
(states and tokens), so a backend may keep those positions' keys and values from the step in which they were
last inside the window instead of recomputing them (the JAX primitive does, torch recomputes the full buffer;
``benchmarks/recurrent_parallel.py``).

Backend primitives (``ops``), numpy at the boundary:

- ``begin(rows, width)``: a rollout's state for a ``[rows, width]`` buffer (zero latents, and whatever the
  backend caches);
- ``advance(state, tokens, mask, keep, start, width) -> (state, change, logits)``: one core iteration of every
  position where ``keep`` (``[B, W]`` bool) is False while the others keep their state; ``change``
  ``[B, width]`` is the relative latent change ``|x' - x| / max(|x|, 1e-30)`` and ``logits``
  ``[B, width, vocab]`` float32 the readout of the new state, both at positions ``start[r] + i`` of row ``r``.
  The loop promises that every position left of ``start[r]`` was kept, and inside the window, in an earlier
  call, with the same token and mask since, and that every position not kept is inside the window.
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
    token was read from), ``outer_steps`` (outer iterations run) and ``mean_depth``.

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
    max_new, pad, V = sampling.max_new_tokens, sampling.pad_id, spec.vocab_size
    gumbel = None if noise is None else gumbel_from_uniform(check_noise(noise, rows, sampling, V))
    rng = np.random.default_rng(seed)
    eos, stops = set(sampling.eos_ids or ()), sampling.stop_sequences
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
    # the attention mask: real prompt tokens and the drafted positions (the last drafted token's own position only
    # predicts a token beyond the draft, but it iterates so the next draft starts warm)
    live = np.concatenate([pmask > 0, np.arange(max_new)[None, :] < drafted[:, None]], axis=1)
    fixed = np.concatenate([np.ones((rows, P), bool), np.zeros((rows, max_new), bool)], axis=1)  # own token final
    iters = np.zeros((rows, W), np.int64)
    frozen = np.zeros((rows, W), bool)
    start = np.zeros(rows, np.int64)  # left of it, every position was kept inside an earlier window
    mask = live.astype(np.int32)  # the attention mask advance sees, kept equal to live in place
    cols, row, gen = np.arange(W), np.arange(rows)[:, None], np.arange(max_new)[None]
    state = ops.begin(rows, W)
    steps = 0
    while not done.all():
        steps += 1
        moving = live & ~frozen
        moving[done] = False
        any_moving = moving.any(1)
        frontier = np.where(any_moving, moving.argmax(1), W)
        end = np.where(any_moving, W - moving[:, ::-1].argmax(1), 0)
        width = window_width(int(np.max(np.where(any_moving, end - start, 0))), W)
        lo = np.minimum(start, W - width)
        state, change, logits = ops.advance(state, tokens, mask, ~moving, lo, width)
        start = frontier  # every position left of it was kept (and inside this window or an earlier one)
        # every moving position is inside the window and every position left of it is kept, so the bookkeeping
        # below runs on the window only
        win = (row, lo[:, None] + cols[:width])
        moves = moving[win]
        it = iters[win] + moves
        iters[win] = it
        # freeze left to right: a position freezes once converged, its own token final (a drafted token may still
        # change its embedding) and every moving position to its left frozen
        converged = ((it >= max_steps) | (change < tol)) & fixed[win]
        frozen[win] |= np.logical_and.accumulate(~moves | converged, axis=1) & moves
        # redraft every token not final (in row order, then position order: the order of the random draws)
        redraft = (gen >= final[:, None]) & (gen < drafted[:, None])
        redraft[done] = False
        r_idx, t_idx = np.nonzero(redraft)
        src = P + t_idx - 1  # the position whose state predicts token t
        g = None if gumbel is None else gumbel[r_idx, t_idx]
        tok, lp = choose_tokens(logits[r_idx, src - lo[r_idx], :V], sampling, g, rng)
        tokens[r_idx, P + t_idx] = tok
        first = np.flatnonzero(t_idx == final[r_idx])  # each row's first token not final, if it is final now
        for i in first[frozen[r_idx[first], src[first]]]:
            r, t = int(r_idx[i]), int(t_idx[i])
            out[r, t], lps[r, t], cmask[r, t], depth[r, t] = tok[i], lp[i], 1, iters[r, src[i]]
            fixed[r, P + t] = True
            final[r] += 1  # the next token's source is this token's position, which cannot be frozen yet
            if int(tok[i]) in eos or (stops and stop_matches(out[r: r + 1, : t + 1], t + 1, stops)[0]):
                done[r] = stopped[r] = True
            if final[r] == max_new:
                done[r] = True
        grow = np.flatnonzero(~done & (drafted < max_new) & (drafted - final < cap))
        live[grow, P + drafted[grow]] = True  # a new position, from the initial state, behind its neighbours
        mask[grow, P + drafted[grow]] = 1
        drafted[grow] += 1
        if steps > (max_new + 1) * max_steps + 1:  # cannot happen: every position freezes by max_steps
            raise RuntimeError("parallel sampler did not finish; this is a bug.")
    roll = Rollout(ptok, pmask, out, cmask, lps, cmask.sum(1).astype(np.int32), ~stopped)
    roll.extras["depth"] = depth
    live = cmask > 0
    roll.extras["mean_depth"] = float(depth[live].mean()) if live.any() else 0.0
    roll.extras["outer_steps"] = steps
    return roll


def window_width(need: int, total: int) -> int:
    """The window an outer step iterates: ``need`` rounded up to 8, 12, 16, 24, 32, 48, ... (each power of two
    and 1.5 times it: at most 1.5x the need, and ``2 log2(total / 8)`` shapes per rollout), capped at the buffer."""
    width = 8
    while width < need:
        width = width * 3 // 2 if width & (width - 1) == 0 else width * 4 // 3
    return int(min(width, total))


def parallel_ops(ops: Any) -> Any:
    """The parallel primitives for the model behind a backend's sequential ``ops`` (its ``parallel()`` when it
    has one, else ``ParallelOps`` of the sibling ``recurrent_parallel`` module of the backend package)."""
    if hasattr(ops, "parallel"):
        return ops.parallel()
    package = type(ops).__module__.rsplit(".", 1)[0]
    return importlib.import_module(package + ".recurrent_parallel").ParallelOps(ops.model)
