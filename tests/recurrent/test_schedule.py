"""The depth schedule: a pure function of (seed, step) with the configured mean."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.recurrent.schedule import DepthSchedule, ScheduleError, from_spec


def test_same_seed_and_step_give_the_same_depth_and_different_steps_vary():
    a, b = DepthSchedule(32, 8, seed=7), DepthSchedule(32, 8, seed=7)
    draws = [a.sample(s) for s in range(200)]
    assert draws == [b.sample(s) for s in range(200)]
    assert len({d.num_steps for d in draws}) > 10
    assert [d.num_steps for d in draws] != [DepthSchedule(32, 8, seed=8).sample(s).num_steps for s in range(200)]


def test_draw_is_order_independent_so_every_rank_agrees():
    s = DepthSchedule(16, 4, seed=3)
    forward = [s.sample(i) for i in range(50)]
    backward = [s.sample(i) for i in reversed(range(50))][::-1]
    assert forward == backward


def test_lognormal_poisson_mean_matches_huginn_and_split_is_consistent():
    s = DepthSchedule(32, 8, seed=0)
    draws = [s.sample(i) for i in range(4000)]
    r = np.array([d.num_steps for d in draws])
    # E[tau] = mean by construction of mu = log(mean) - sigma^2 / 2, and r = Poisson(tau) + 1
    assert abs(r.mean() - 33) < 0.6
    lo, hi = np.percentile(r, [5, 95])
    assert 10 <= lo <= 15 and 60 <= hi <= 75  # NOTES.md: 5-95% range about 12-67
    for d in draws:
        assert d.n_grad == min(d.num_steps, 8) and d.n_no_grad == max(d.num_steps - 8, 0) and d.num_steps >= 1


def test_fixed_and_bucketed_modes():
    assert {DepthSchedule(12, 4, mode="fixed").sample(i).num_steps for i in range(20)} == {12}
    b = DepthSchedule(8, 4, mode="bucketed", buckets=(16, 4, 8, 32))
    depths = {b.sample(i).num_steps for i in range(300)}
    assert depths <= {4, 8, 16, 32} and len(depths) >= 3
    plain = DepthSchedule(8, 4)
    for i in range(100):
        r = plain.sample(i).num_steps
        assert b.sample(i).num_steps == next((x for x in (4, 8, 16, 32) if x >= r), 32)


@pytest.mark.parametrize("kw,match", [
    (dict(mean_recurrence=0), "mean_recurrence must be >= 1"),
    (dict(backprop_depth=0), "backprop_depth k must be >= 1"),
    (dict(mode="uniform"), "Unknown depth schedule mode"),
    (dict(mode="bucketed"), "needs buckets"),
    (dict(sigma=-1.0), "sigma"),
])
def test_bad_schedules_raise_clear_errors(kw, match):
    with pytest.raises(ScheduleError, match=match):
        DepthSchedule(**{"mean_recurrence": 8, "backprop_depth": 4, **kw})


def test_from_spec_reads_mean_recurrence_and_backprop_depth():
    from diptych.core.recurrent_spec import tiny_recurrent_spec

    s = from_spec(tiny_recurrent_spec(mean_recurrence=6, mean_backprop_depth=3), mode="fixed")
    assert s.sample(0).num_steps == 6 and s.sample(0).n_grad == 3
