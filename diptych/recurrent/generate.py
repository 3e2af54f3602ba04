"""Generation with fixed or adaptive recurrent depth, written once for both backends.

The loop owns everything that is not array math, in numpy: prompt layout, the depth policy,
the exit criterion, token choice (``core.sampling``) and stopping. A backend hands over a few
primitives on its own arrays, so the same primitives give the same tokens and depths on JAX
and torch.

Two paths share this loop:

- ``cache=True`` (default): the prompt is prefilled once at the full ``num_steps`` (never an
  exit during prefill) and every layer's K/V is kept, the core block's per iteration (slot =
  (core layer, iteration)). Each new token then runs the prelude on one position, its own
  recurrence against the cached slots of the same iteration, and the coda. A token that exited
  at depth d < i is read at iteration i from its entry at d (Huginn's "latest" fallback),
  decided per row, so one row's exit never touches another row's cache; left padding is masked.
  Primitives: ``ops.decoder(rows, capacity, steps)`` returning an object with ``prefill``,
  ``feed``, ``init``, ``step``, ``logits_last``, ``latent_last``, ``select`` and ``finish``
  (and optionally ``run_fixed``: a whole fixed-depth token in one call, for compiled backends).
- ``cache=False``: each new token re-runs the whole sequence, every position iterating as many
  times as the new token does. O(T^2), kept as the reference semantics: at fixed depth with a
  zero initial state it equals the cached path. Elsewhere the two differ by design: under
  adaptive exit past tokens keep their own depth only with the cache, and with random s0 the
  uncached path redraws every position's s0 for every token. Primitives: ``prelude``, ``init``,
  ``step``, ``logits_last``, ``latent_last``, ``select`` (and ``warm`` for warm start).

With ``warm_start`` a new token's recurrence starts from the previous token's final latent
state (continuous CoT) instead of fresh noise.
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
             noise: np.ndarray | None = None, seed: int | None = None, cache: bool = True,
             record_logits: bool = False, sampler: str = "sequential", tol: float = 1e-5) -> Rollout:
    """Sample completions; ``extras["depth"]`` is the iterations each generated token used ``[N, max_new]``.

    ``num_steps`` is the fixed depth, or the cap with ``exit_criterion`` (a name registered in
    ``diptych.recurrent.exit.CRITERIA``, or an ``ExitCriterion``). ``init_scale`` scales Huginn's random s0 (0 = zeros),
    drawn from ``numpy.random.default_rng(state_seed)``; ``warm_start`` starts each new token
    from the previous token's final state (continuous CoT). ``cache=False`` selects the
    uncached reference path. ``record_logits`` adds ``extras["logits"]`` ``[N, max_new, V]``
    (the logits each token was chosen from), for tests and analysis.

    ``sampler="parallel"`` runs ``diptych.recurrent.parallel`` instead (all positions iterate at once, each
    stops when its state changed by less than ``tol``, ``num_steps`` the cap); it takes no exit criterion,
    random s0, warm start or recorded logits.
    """
    if sampler == "parallel":
        extra = {"exit_criterion": exit_criterion, "init_scale": init_scale, "warm_start": warm_start,
                 "record_logits": record_logits}
        bad = [k for k, v in extra.items() if v not in (None, 0.0, False)]
        if bad:
            raise ValueError(f"sampler='parallel' exits on convergence (tol) from a zero state; drop "
                             f"{', '.join(bad)} or use sampler='sequential'.")
        from diptych.recurrent.parallel import parallel_generate, parallel_ops

        return parallel_generate(parallel_ops(ops), prompts, sampling, num_steps=num_steps, tol=tol, noise=noise,
                                 seed=seed)
    if sampler != "sequential":
        raise ValueError(f"sampler must be 'sequential' or 'parallel', got {sampler!r}.")
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
    if cache and not hasattr(ops, "decoder"):
        raise TypeError(f"{type(ops).__name__} has no cached decode primitives (ops.decoder); "
                        "pass cache=False to use the uncached path.")
    sampling = sampling.resolve(spec)
    ptok, pmask = prepare_prompts(prompts, sampling, spec)
    rows, max_new, pad = ptok.shape[0], sampling.max_new_tokens, sampling.pad_id
    gumbel = None if noise is None else gumbel_from_uniform(check_noise(noise, rows, sampling, spec.vocab_size))
    run = _Run(rows, max_new, pad, record_logits, spec.vocab_size)
    rng = np.random.default_rng(seed)
    state_rng = np.random.default_rng(state_seed)
    eos = np.asarray(sampling.eos_ids or (-1,))
    tokens = _cached_tokens if cache else _uncached_tokens
    for t, logits, used in tokens(ops, ptok, pmask, run, steps, crit, init_scale, state_rng, warm_start):
        tok, lp = choose_tokens(logits[:, : spec.vocab_size], sampling, None if gumbel is None else gumbel[:, t], rng)
        run.record(t, tok, lp, used, logits)
        finished = np.isin(run.out[:, t], eos) | stop_matches(run.out[:, : t + 1], t + 1, sampling.stop_sequences)
        run.done |= finished & ~run.done
        if run.done.all():
            break
    return run.rollout(ptok, pmask)


class _Run:
    """The rollout being written, token by token, shared by both paths."""

    def __init__(self, rows: int, max_new: int, pad: int, record_logits: bool, vocab: int) -> None:
        self.pad = pad
        self.out = np.full((rows, max_new), pad, np.int32)
        self.cmask = np.zeros((rows, max_new), np.int32)
        self.lps = np.zeros((rows, max_new), np.float32)
        self.depth = np.zeros((rows, max_new), np.int32)
        self.done = np.zeros(rows, bool)
        self.logits = np.zeros((rows, max_new, vocab), np.float32) if record_logits else None

    def record(self, t: int, tok: np.ndarray, lp: np.ndarray, used: np.ndarray, logits: np.ndarray) -> None:
        done = self.done
        self.out[:, t] = np.where(done, self.pad, tok)
        self.lps[:, t], self.cmask[:, t] = np.where(done, 0, lp), ~done
        self.depth[:, t] = np.where(done, 0, used)
        if self.logits is not None:
            self.logits[:, t] = logits[:, : self.logits.shape[-1]]

    def rollout(self, ptok: np.ndarray, pmask: np.ndarray) -> Rollout:
        roll = Rollout(ptok, pmask, self.out, self.cmask, self.lps, self.cmask.sum(1).astype(np.int32), ~self.done)
        roll.extras["depth"] = self.depth
        live = self.cmask > 0
        roll.extras["mean_depth"] = float(self.depth[live].mean()) if live.any() else 0.0
        if self.logits is not None:
            roll.extras["logits"] = self.logits
        return roll


def _cached_tokens(ops, ptok, pmask, run: _Run, steps, crit, init_scale, state_rng, warm_start):
    """Prefill once at full depth, then one position per token against the per-iteration KV cache."""
    spec, (rows, width) = ops.spec, ptok.shape
    max_new = run.out.shape[1]
    dec = ops.decoder(rows, width + max_new, steps)
    s0 = initial_state_noise(spec, (rows, width, spec.n_embd), state_rng, init_scale)
    logits, prev_final = dec.prefill(ptok, pmask, s0)
    yield 0, logits, np.full(rows, steps, np.int32)
    for t in range(1, max_new):
        ctx = dec.feed(run.out[:, t - 1], run.cmask[:, t - 1])
        if warm_start:
            x = prev_final
        else:
            x = dec.init(ctx, initial_state_noise(spec, (rows, 1, spec.n_embd), state_rng, init_scale))
        if crit is None and hasattr(dec, "run_fixed"):  # one compiled call per token where a backend has it
            x, logits = dec.run_fixed(ctx, x, run.done.copy())  # run.done changes later; see _iterate
            used = np.full(rows, steps, np.int32)
        else:
            (x, logits), used = _iterate(dec, ctx, x, steps, crit, run.done)
        dec.finish(ctx, used)
        prev_final = x
        yield t, logits, used


def _uncached_tokens(ops, ptok, pmask, run: _Run, steps, crit, init_scale, state_rng, warm_start):
    """The reference: re-run the whole sequence for every token."""
    spec, rows, max_new, pad = ops.spec, ptok.shape[0], run.out.shape[1], run.pad
    prev_final = None
    for t in range(max_new):
        # A fixed width (left padding, masked) so compiled backends see one shape for the whole rollout.
        lead = max_new - t
        tokens = np.concatenate([np.full((rows, lead), pad, np.int32), ptok, run.out[:, :t]], axis=1)
        mask = np.concatenate([np.zeros((rows, lead), np.int32), pmask, (run.cmask[:, :t] > 0).astype(np.int32)],
                              axis=1)
        ctx = ops.prelude(tokens, mask)
        s0 = initial_state_noise(spec, (rows, tokens.shape[1], spec.n_embd), state_rng, init_scale)
        x = ops.init(ctx, s0)
        if warm_start and prev_final is not None:
            x = ops.warm(x, prev_final)
        (x, logits), used = _iterate(ops, ctx, x, steps, None if t == 0 else crit, run.done)
        prev_final = x
        yield t, logits, used


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
        # the criterion's contract says what to compute: no readout for a latent-only criterion
        logits = ops.logits_last(ctx, x) if crit.needs_logits else None
        latent = ops.latent_last(x) if crit.needs_latent else None
        _, passed = crit.update(logits, latent)
        new = passed & ~exited
        used[new] = i
        # a new array, never an in-place update: JAX on CPU may still be reading the one select was given
        # (async dispatch), and a late read froze a row one iteration early (wrong logits, right depth)
        exited = exited | new
        if exited.all():
            break
    return (x, ops.logits_last(ctx, x)), used
