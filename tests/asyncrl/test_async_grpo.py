"""Asynchronous GRPO against its oracle, the synchronous loop: with max_staleness 0 the two runs are the same
step for step; with staleness allowed the bound holds, stale groups are counted, and the metrics exist."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ROWS, SPEC, TOK, Recorder, config, fresh_state, run, variety

from diptych.asyncrl.config import AsyncConfig, AsyncConfigError
from diptych.asyncrl.orchestrator import AsyncGRPO, Phases
from diptych.core.backend import get_backend
from diptych.core.trainers import grpo


def test_max_staleness_0_equals_the_synchronous_run_bit_for_bit(backend):
    """Same rollouts (every trained token array), same rewards and the same weights after 3 steps, exactly: the
    generator's model is rebuilt from the trainer's canonical weights and draws with the sync loop's seed."""
    cfg = config(steps=3)
    w_sync, m_sync, b_sync = run(backend, cfg)
    w_async, m_async, b_async = run(backend, config(steps=3, enabled=True, max_staleness=0))
    assert len(b_sync) == len(b_async) == 3
    for bs, ba in zip(b_sync, b_async):
        for key in ("tokens", "attention_mask", "mask", "sampler_logprobs", "advantages"):
            np.testing.assert_array_equal(bs[key], ba[key], err_msg=key)
    assert [m_sync[s]["reward"] for s in (1, 2, 3)] == [m_async[s]["reward"] for s in (1, 2, 3)]
    assert max(float(np.abs(w_sync[k] - SPEC.init_weights(0)[k]).max()) for k in w_sync) > 1e-4  # weights moved
    for k in w_sync:
        np.testing.assert_array_equal(w_sync[k], w_async[k], err_msg=k)
    for s in (1, 2, 3):
        assert m_async[s]["async/staleness_max"] == 0.0 and m_async[s]["async/groups_dropped"] == 0.0
        assert m_async[s]["async/generator_tokens_per_s"] > 0 and m_async[s]["async/trainer_tokens_per_s"] > 0


def _phases():
    return Phases(sample=grpo.sample_rollout, score=grpo.score, advantages=grpo.advantage_batch,
                  train=grpo.train_on_batch)


@pytest.mark.parametrize("policy", ["drop", "reweight"])
def test_the_staleness_bound_holds_under_a_slow_trainer(policy):
    """A trainer that sleeps while the generator may run 3 steps ahead: groups older than max_staleness=1 are
    dropped and counted (or kept with smaller weights), and no trained token is older than the bound (drop)."""
    backend = get_backend("torch")
    cfg = config(steps=4, enabled=True, max_staleness=1, max_ahead=3, stale_policy=policy)
    rec = Recorder()
    seen = []
    run_ = AsyncGRPO(backend, fresh_state(backend, cfg), TOK, variety, ROWS, cfg, _phases(), train_delay_s=0.5)
    train = run_.phases.train

    def spy(backend_, state, batch, *a, **k):
        seen.append(batch["advantages"])
        return train(backend_, state, batch, *a, **k)

    run_.phases = Phases(run_.phases.sample, run_.phases.score, run_.phases.advantages, spy)
    weights = []
    stale_weights = run_._stale_weights

    def spy_weights(groups):
        w = stale_weights(groups)
        lag = np.concatenate([np.where(g.arrays["mask"] > 0, run_.version - g.arrays["versions"], 0)
                              for g in sorted(groups, key=lambda g: g.index)])
        weights.append((w, lag, np.concatenate([g.arrays["mask"] for g in sorted(groups, key=lambda g: g.index)])))
        return w

    run_._stale_weights = spy_weights
    run_.run(cfg.steps, lambda s, st, m: rec.log(s, m))
    dropped = sum(m["async/groups_dropped"] for m in rec.rows.values())
    lags = [m["async/staleness_max"] for m in rec.rows.values()]
    if policy == "drop":
        assert dropped > 0
        assert max(lags) <= 1
    else:
        assert dropped == 0 and max(lags) > 1
        assert any((w < 1).any() for w, _, _ in weights)
        for (w, lag, mask), adv in zip(weights, seen):
            # oracle: 0.5 ** (lag - max_staleness) where the lag exceeds the bound, 1 elsewhere
            np.testing.assert_allclose(w, np.where(lag > 1, 0.5 ** (lag - 1.0), 1.0))
            base = adv / w  # the trained advantage is the group advantage times the weight, per token
            on = mask > 0
            row_const = [np.ptp(base[r][on[r]]) for r in range(len(base)) if on[r].any()]
            assert max(row_const) < 1e-6


def test_bad_async_settings_are_refused():
    with pytest.raises(AsyncConfigError, match="stale_policy must be one of"):
        AsyncConfig(stale_policy="keep")
    with pytest.raises(AsyncConfigError, match="set placement=process"):
        AsyncConfig(generator_cores=(1,))
    with pytest.raises(AsyncConfigError, match="max_staleness must be >= 0"):
        AsyncConfig(max_staleness=-1)
