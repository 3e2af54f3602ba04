"""The off-policy correction against a numpy transcription of its formulas (TIS, AReaL's decoupled PPO), and
through both backends' train steps."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core.config import ConfigError
from diptych.core.losses import PolicyLossConfig, finalize_metrics, policy_loss, reduce_loss
from diptych.core.losses.offpolicy import OffPolicyLossConfig, offpolicy_loss
from diptych.core.losses.registry import loss_spec


def _batch(seed: int = 0, B: int = 4, T: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lp = rng.normal(-2.0, 0.5, (B, T))
    return {"logprobs": lp, "old_logprobs": lp + rng.normal(0, 0.05, (B, T)),
            "sampler_logprobs": lp + rng.normal(0, 0.6, (B, T)),
            "advantages": rng.normal(0, 1, B), "mask": (rng.random((B, T)) < 0.8).astype(np.float64)}


def _oracle(b: dict[str, np.ndarray], correction: str, cap: float, eps: float = 0.2) -> float:
    """Token-mean clipped surrogate with the behaviour weight, written from the papers' formulas."""
    r = np.exp(b["logprobs"] - b["old_logprobs"])
    a = b["advantages"][:, None]
    pg = np.maximum(-a * r, -a * np.clip(r, 1 - eps, 1 + eps))
    w = np.exp(b["old_logprobs"] - b["sampler_logprobs"])
    if correction == "tis":
        w = np.minimum(w, cap)
    elif correction == "decoupled":
        w = np.where(w > cap, 0.0, w)
    else:
        w = np.ones_like(w)
    m = b["mask"]
    return float((pg * w * m).sum() / m.sum())


@pytest.mark.parametrize("correction", ["none", "tis", "decoupled"])
def test_loss_matches_the_numpy_formula(correction):
    b = _batch()
    cfg = OffPolicyLossConfig(policy=PolicyLossConfig(), correction=correction, cap=1.5)
    total, denom, metrics = offpolicy_loss(b, cfg)
    assert float(reduce_loss(total, denom)) == pytest.approx(_oracle(b, correction, 1.5), rel=1e-12)
    if correction != "none":
        w = np.exp(b["old_logprobs"] - b["sampler_logprobs"])
        m = finalize_metrics(metrics)
        assert 0 < m["offpolicy_clipfrac"] < 1  # the cap acts on some tokens and not on others
        assert m["offpolicy_clipfrac"] == pytest.approx(((w > 1.5) * b["mask"]).sum() / b["mask"].sum())


def test_tis_is_the_policy_loss_with_its_tis_cap():
    b = _batch(1)
    got = offpolicy_loss(b, OffPolicyLossConfig(correction="tis", cap=2.0))
    want = policy_loss(b, PolicyLossConfig(tis_cap=2.0))
    assert float(reduce_loss(*got[:2])) == pytest.approx(float(reduce_loss(*want[:2])), rel=1e-12)


def test_none_needs_no_behaviour_logprobs_and_decoupled_says_it_does():
    b = _batch(2)
    del b["sampler_logprobs"]
    offpolicy_loss(b, OffPolicyLossConfig(correction="none"))
    with pytest.raises(Exception, match="sampler_logprobs"):
        offpolicy_loss(b, OffPolicyLossConfig(correction="decoupled"))


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="correction must be one of"):
        OffPolicyLossConfig(correction="vtrace")
    with pytest.raises(ConfigError, match="weight twice"):
        OffPolicyLossConfig(policy=PolicyLossConfig(tis_cap=2.0), correction="tis")
    with pytest.raises(ConfigError, match="cap must be > 0"):
        OffPolicyLossConfig(correction="tis", cap=0.0)


def test_registered_with_the_policy_layout():
    spec = loss_spec("offpolicy")
    assert spec.config is OffPolicyLossConfig
    assert spec.outputs(OffPolicyLossConfig()) == {"logprobs"}
    assert spec.outputs(OffPolicyLossConfig(policy=PolicyLossConfig(entropy_coef=0.1))) == {"logprobs", "entropy"}


@pytest.mark.parametrize("correction", ["tis", "decoupled"])
def test_both_backends_train_the_offpolicy_loss_to_the_numpy_value(backend, correction):
    """The loss a backend's train step reports equals the numpy formula on the log-probs it recomputes (the
    proximal policy is the detached current one, the behaviour log-probs are perturbed as a stale policy's)."""
    from diptych.core.optim import OptimConfig
    from diptych.core.sampling import SamplingConfig
    from diptych.core.spec import tiny_spec
    from diptych.core.trainers.base import rollout_batch, sequence_logprobs

    spec = tiny_spec("llama", vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    state = backend.init_train_state(backend.build(spec, spec.init_weights(0)), OptimConfig(lr=1e-3))
    roll = backend.generate(state.model, [[1, 2, 3], [4, 5]], SamplingConfig(max_new_tokens=5, n=4, eos_ids=()),
                            seed=0)
    b = rollout_batch(roll, 4)
    rng = np.random.default_rng(0)
    b["sampler_logprobs"] = (b["sampler_logprobs"] + rng.normal(0, 0.5, b["mask"].shape) * b["mask"]).astype(
        np.float32)
    b["advantages"] = rng.normal(0, 1, len(b["mask"])).astype(np.float32)
    lp = sequence_logprobs(backend, state.model, b["tokens"], b["attention_mask"], b["mask"])
    want = _oracle({"logprobs": lp, "old_logprobs": lp, "sampler_logprobs": b["sampler_logprobs"],
                    "advantages": b["advantages"], "mask": b["mask"]}, correction, 1.5)
    cfg = OffPolicyLossConfig(policy=PolicyLossConfig(), correction=correction, cap=1.5)
    _, metrics = backend.train_step(state, [b], "offpolicy", cfg)
    assert metrics["loss"] == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert 0 < metrics["offpolicy_clipfrac"] < 1
