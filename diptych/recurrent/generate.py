"""Generation with fixed or adaptive recurrent depth, written once for both backends.

A backend hands over five primitives on its own arrays (``prelude``, ``init``, ``step``,
``logits_last``, ``latent_last``, ``select``); this loop owns everything else in numpy:
prompt layout, the depth policy, the exit criterion, token choice (``core.sampling``) and
stopping. Same primitives in, same tokens and depths out, on JAX and torch.

There is no KV cache: each new token re-runs the whole sequence, every position iterating as
many times as the new token does. That is O(T^2) but exact for its own semantics, and it
avoids the two cache bugs of Huginn's reference (ignored padding, KV leaking across batch
rows under adaptive exit). The first token after the prompt (prefill) always runs the full
``num_steps``: no exit during prefill.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diptych.core.recurrent_spec import initial_state_noise
from diptych.core.sampling import (
    Rollout,
    SamplingConfig,
    check_noise,
    choose_tokens,
    gumbel_from_uniform,
    prepare_prompts,
    stop_matches,
)
from diptych.recurrent.exit import ExitCriterion, get_exit_criterion


def generate(ops: Any, prompts: Any, sampling: SamplingConfig, *, num_steps: int | None = None,
             exit_criterion: str | ExitCriterion | None = None, exit_threshold: float | None = None,
             init_scale: float = 0.0, state_seed: int = 0, warm_start: bool = False,
             noise: np.ndarray | None = None, seed: int | None = None) -> Rollout:
    """Sample completions; ``extras["depth"]`` is the iterations each generated token used ``[N, max_new]``.

    ``num_steps`` is the fixed depth, or the cap with ``exit_criterion`` (a name from
    ``diptych.recurrent.exit.CRITERIA``). ``init_scale`` scales Huginn's random s0 (0 = zeros),
    drawn from ``numpy.random.default_rng(state_seed)``; ``warm_start`` starts each new token
    from the previous token's final state (continuous CoT).
    """
    spec = ops.spec
    steps = int(spec.mean_recurrence if num_steps is None else num_steps)
    if steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    crit = None
    if exit_criterion is not None:
        crit = exit_criterion if isinstance(exit_criterion, ExitCriterion) else get_exit_criterion(
            exit_criterion, exit_threshold)
    if not isinstance(sampling, SamplingConfig):
        raise TypeError("sampling must be a diptych.core.sampling.SamplingConfig.")
    sampling = sampling.resolve(spec)
    ptok, pmask = prepare_prompts(prompts, sampling, spec)
    rows, max_new, pad = ptok.shape[0], sampling.max_new_tokens, sampling.pad_id
    gumbel = None if noise is None else gumbel_from_uniform(check_noise(noise, rows, sampling, spec.vocab_size))
    rng = np.random.default_rng(seed)
    state_rng = np.random.default_rng(state_seed)
    out = np.full((rows, max_new), pad, np.int32)
    cmask = np.zeros((rows, max_new), np.int32)
    lps = np.zeros((rows, max_new), np.float32)
    depth = np.zeros((rows, max_new), np.int32)
    done = np.zeros(rows, bool)
    eos = np.asarray(sampling.eos_ids or (-1,))
    prev_final = None
    for t in range(max_new):
        # A fixed width (left padding, masked) so compiled backends see one shape for the whole rollout.
        lead = max_new - t
        tokens = np.concatenate([np.full((rows, lead), pad, np.int32), ptok, out[:, :t]], axis=1)
        mask = np.concatenate([np.zeros((rows, lead), np.int32), pmask, (cmask[:, :t] > 0).astype(np.int32)], axis=1)
        ctx = ops.prelude(tokens, mask)
        s0 = initial_state_noise(spec, (rows, tokens.shape[1], spec.n_embd), state_rng, init_scale)
        x = ops.init(ctx, s0)
        if warm_start and prev_final is not None:
            x = ops.warm(x, prev_final)
        logits, used = _iterate(ops, ctx, x, steps, None if t == 0 else crit, done)
        x, logits = logits
        prev_final = x
        tok, lp = choose_tokens(logits[:, : spec.vocab_size], sampling, None if gumbel is None else gumbel[:, t], rng)
        tok = np.where(done, pad, tok)
        out[:, t], lps[:, t], cmask[:, t] = tok, np.where(done, 0, lp), ~done
        depth[:, t] = np.where(done, 0, used)
        finished = np.isin(tok, eos) | stop_matches(out[:, : t + 1], t + 1, sampling.stop_sequences)
        done |= finished & ~done
        if done.all():
            break
    roll = Rollout(ptok, pmask, out, cmask, lps, cmask.sum(1).astype(np.int32), ~done)
    roll.extras["depth"] = depth
    live = cmask > 0
    roll.extras["mean_depth"] = float(depth[live].mean()) if live.any() else 0.0
    return roll


def _iterate(ops: Any, ctx: Any, x: Any, steps: int, crit: ExitCriterion | None, frozen: np.ndarray):
    """Run up to ``steps`` iterations; rows that pass ``crit`` stop there (their state is frozen,
    so the final readout is the readout at their exit)."""
    rows = frozen.shape[0]
    used = np.full(rows, steps, np.int32)
    exited = frozen.copy()
    if crit is not None:
        crit.reset(rows)
    for i in range(1, steps + 1):
        x_new = ops.step(ctx, x)
        x = ops.select(exited, x_new, x) if exited.any() else x_new
        if crit is None:
            continue
        logits = ops.logits_last(ctx, x) if crit.needs_logits else None
        _, passed = crit.update(logits, ops.latent_last(x))
        new = passed & ~exited
        used[new] = i
        exited |= new
        if exited.all():
            break
    return (x, ops.logits_last(ctx, x)), used
