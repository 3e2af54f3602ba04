"""CombinedReward: weights, not-applicable values, concurrency, and failures that never crash a run."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import pytest

from diptych.core.rewards import CombinedReward, RewardResult, get_reward


def constant(value):
    def fn(prompts, completions, **kw):
        return [value] * len(completions)

    return fn


def test_weighted_total_and_components():
    def by_length(prompts, completions):
        return [float(len(c)) for c in completions]

    combo = CombinedReward({"len": by_length, "one": constant(1.0)}, weights={"len": 0.5})
    r = combo(["a", "b"], ["xx", "xxxx"])
    assert isinstance(r, RewardResult) and r.failures == 0
    np.testing.assert_allclose(r.total, [0.5 * 2 + 1, 0.5 * 4 + 1])
    np.testing.assert_allclose(r.components["len"], [2, 4])
    assert r.metrics()["reward/len"] == 3.0


def test_none_is_not_applicable_and_left_out_of_the_sum():
    combo = CombinedReward([("maybe", lambda p, c: [None, 2.0]), ("one", constant(1.0))], weights=[10.0, 1.0])
    r = combo(["", ""], ["a", "b"])
    np.testing.assert_allclose(r.total, [1.0, 21.0])
    assert np.isnan(r.components["maybe"][0]) and r.metrics()["reward/maybe"] == 2.0


def test_columns_are_routed_to_rewards_that_name_them():
    seen = {}

    def wants_answer(prompts, completions, answer):
        seen["answer"] = answer
        return [1.0] * len(completions)

    combo = CombinedReward({"a": wants_answer, "m": get_reward("math")})
    r = combo(["q"], [r"\boxed{7}"], answer=["7"], extra=["ignored"])
    assert seen["answer"] == ["7"] and r.total[0] == 2.0


def test_a_raising_reward_costs_only_the_failing_samples(caplog):
    def fragile(prompts, completions):
        if any("boom" in c for c in completions):
            raise RuntimeError("boom")
        return [1.0] * len(completions)

    combo = CombinedReward({"fragile": fragile, "one": constant(1.0)})
    with caplog.at_level(logging.WARNING, logger="diptych.rewards"):
        r = combo(["", "", ""], ["ok", "boom", "ok"])
    np.testing.assert_allclose(r.components["fragile"], [1.0, 0.0, 1.0])
    np.testing.assert_allclose(r.total, [2.0, 1.0, 2.0])
    assert r.failures == 1 and r.failures_by_reward == {"fragile": 1, "one": 0}
    assert "boom" in caplog.text


def test_a_slow_reward_times_out_to_zero_while_the_others_count():
    def stuck(prompts, completions):
        time.sleep(5)
        return [1.0] * len(completions)

    combo = CombinedReward({"stuck": stuck, "one": constant(1.0)}, timeout=0.3)
    start = time.monotonic()
    r = combo(["", ""], ["a", "b"])
    assert time.monotonic() - start < 2.0
    np.testing.assert_allclose(r.total, [1.0, 1.0])
    assert r.failures == 2 and "timed out" in r.errors[0]


def test_bad_return_values_are_failures_not_crashes():
    combo = CombinedReward({"short": lambda p, c: [1.0], "nan": lambda p, c: [float("nan")] * len(c),
                            "text": lambda p, c: ["high"] * len(c)})
    r = combo(["", ""], ["a", "b"])
    np.testing.assert_allclose(r.total, [1.0, 1.0])  # the short one is fine alone, sample by sample
    assert r.failures_by_reward == {"short": 0, "nan": 2, "text": 2}


def test_async_rewards_run_concurrently():
    async def slow(prompts, completions):
        await asyncio.sleep(0.4)
        return [1.0] * len(completions)

    combo = CombinedReward([("a", slow), ("b", slow), ("c", slow)])
    start = time.monotonic()
    r = combo(["x"], ["y"])
    assert time.monotonic() - start < 1.0  # three 0.4 s rewards overlapped
    assert r.total[0] == 3.0 and r.failures == 0


def test_configuration_errors_raise_immediately():
    with pytest.raises(KeyError, match="needs column"):
        CombinedReward(["math"])(["q"], ["1"])
    with pytest.raises(ValueError, match="weights for unknown"):
        CombinedReward({"a": constant(1.0)}, weights={"b": 1.0})
    with pytest.raises(ValueError, match="2 weights for 1"):
        CombinedReward({"a": constant(1.0)}, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="prompts"):
        CombinedReward({"a": constant(1.0)})(["q"], ["1", "2"])
    with pytest.raises(ValueError, match="unique"):
        CombinedReward(["format", "format"])
