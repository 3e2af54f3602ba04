"""The backend-neutral half of a train step (diptych.core.train_step), on numpy alone."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core import train_step as TS
from diptych.core.losses import PolicyLossConfig, SFTLossConfig, ValueLossConfig
from diptych.core.train_batch import needed_outputs


def _policy_mb(b=2, t=5, old=True):
    mb = {"tokens": np.ones((b, t), np.int64), "attention_mask": np.ones((b, t), np.int64),
          "mask": np.ones((b, t - 1), np.float32), "advantages": np.ones(b, np.float32)}
    if old:
        mb["old_logprobs"] = np.zeros((b, t - 1), np.float32)
    return mb


def test_configs_are_checked_against_the_registered_class():
    assert TS.resolve_configs({"sft": 1.0}, SFTLossConfig()) == {"sft": SFTLossConfig()}
    assert TS.resolve_configs({"sft": 1.0}, {"sft": SFTLossConfig()}) == {"sft": SFTLossConfig()}
    with pytest.raises(TS.StepError, match="takes a PolicyLossConfig as its config, got SFTLossConfig"):
        TS.resolve_configs({"policy": 1.0}, SFTLossConfig())
    with pytest.raises(TS.StepError, match="needs loss_config as a mapping"):
        TS.resolve_configs({"policy": 1.0, "value": 0.5}, PolicyLossConfig())


def test_plan_says_what_to_compute_per_microbatch():
    plan = TS.prepare_step([_policy_mb(), _policy_mb(old=False)], "policy", PolicyLossConfig(), has_value_head=False)
    assert plan.outputs == (frozenset({"logprobs"}), frozenset({"logprobs"}))
    assert plan.int_keys == {"tokens", "attention_mask"}
    composite = {"policy": PolicyLossConfig(entropy_coef=0.01), "value": ValueLossConfig()}
    assert needed_outputs(["policy", "value"], composite) == {"logprobs", "entropy", "values"}
    with pytest.raises(TS.StepError, match="'value' loss needs a value head"):
        vmb = {**_policy_mb(), "old_values": np.zeros((2, 4), np.float32), "returns": np.zeros((2, 4), np.float32)}
        TS.prepare_step([vmb], {"policy": 1.0, "value": 0.5}, composite, has_value_head=False)
    with pytest.raises(TS.StepError, match="at least one micro-batch"):
        TS.prepare_step([], "sft", SFTLossConfig(), has_value_head=False)


def test_loss_inputs_fill_detached_defaults_only_when_absent():
    marked = lambda x: ("sg", x)  # a stand-in stop-gradient that shows where it was applied
    lp = np.full((2, 4), -1.0)
    got = TS.loss_inputs(_policy_mb(old=False), {"logprobs": lp}, ["policy"], marked, ("detached_logprobs",))
    assert got["old_logprobs"][0] == "sg" and got["old_logprobs"][1] is lp
    assert got["detached_logprobs"][0] == "sg"
    assert "tokens" not in got and "attention_mask" not in got
    given = TS.loss_inputs(_policy_mb(), {"logprobs": lp}, ["policy"], marked)
    assert isinstance(given["old_logprobs"], np.ndarray)


def test_totals_average_loss_metrics_take_the_max_gap_and_skip_non_finite():
    plan = TS.prepare_step([_policy_mb(), _policy_mb()], "policy", PolicyLossConfig(), has_value_head=False)
    totals = TS.StepTotals(plan)
    totals.add(_policy_mb(), [2.0], [4.0], [{"ratio": 4.0, "ratio_count": 4.0}], {"sampler_logprob_gap": 0.1})
    totals.add(_policy_mb(), [6.0], [4.0], [{"ratio": 8.0, "ratio_count": 4.0}], {"sampler_logprob_gap": 0.3})
    totals.close()
    assert totals.loss == pytest.approx(1.0)
    m = totals.report(step=0, grad_norm=1.0, lr=1e-3)
    assert m["ratio"] == pytest.approx(1.5) and m["sampler_logprob_gap"] == pytest.approx(0.3)
    assert m["tokens"] == 20 and m["denominator"] == 8.0 and m["skipped"] == 0.0
    nan = TS.StepTotals(plan)
    nan.add(_policy_mb(), [float("nan")], [4.0], [{}], {})
    with pytest.warns(RuntimeWarning, match="Skipping optimizer step 3"):
        assert nan.close().report(step=3, grad_norm=1.0, lr=1e-3)["skipped"] == 1.0
    with pytest.raises(TS.StepError, match=r"total denominator 0\.0"):
        TS.StepTotals(plan).close()


def test_sampler_gap_is_the_max_over_the_mask():
    lp = np.array([[-1.0, -2.0, -3.0]])
    got = TS.extra_metrics({"logprobs": lp, "sampler_logprobs": np.array([[-1.5, -2.0, -9.0]]),
                            "mask": np.array([[1.0, 1.0, 0.0]])})
    assert float(got["sampler_logprob_gap"]) == pytest.approx(0.5)
    assert TS.extra_metrics({"logprobs": lp, "mask": np.ones((1, 3))}) == {}
