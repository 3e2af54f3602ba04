"""Every loss against values small enough to check on paper (numpy inputs, float64).

Gradients here are central finite differences of ``sum / denominator`` in float64, so these tests
need no framework; cross-framework agreement lives in test_loss_parity.py.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from diptych.core.config import ConfigError, from_dict
from diptych.core.losses import (
    LOSSES,
    POLICY_PRESETS,
    LossInputError,
    PolicyLossConfig,
    PreferenceLossConfig,
    SFTLossConfig,
    ValueLossConfig,
    finalize_metrics,
    get_loss,
    kl_estimate,
    policy_loss,
    policy_preset,
    preference_loss,
    reduce_loss,
    sft_loss,
    value_loss,
)


def _loss(fn, batch, cfg) -> float:
    s, d, _ = fn(batch, cfg)
    return float(s) / float(d)


def _fd_grad(fn, batch, cfg, key, h=1e-6) -> np.ndarray:
    x = np.asarray(batch[key], np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        hi, lo = x.copy(), x.copy()
        hi[i] += h
        lo[i] -= h
        g[i] = (_loss(fn, {**batch, key: hi}, cfg) - _loss(fn, {**batch, key: lo}, cfg)) / (2 * h)
    return g


def _one_token(ratio: float, adv: float, **extra) -> dict:
    old = np.array([[-1.0]])
    return {"logprobs": old + math.log(ratio), "old_logprobs": old, "advantages": np.array([adv]),
            "mask": np.array([[1]]), **extra}


# ratio, advantage, expected loss, expected d loss / d logp, clipped side
PPO_CASES = [
    (1.5, 1.0, -1.2, 0.0, "high"),   # A > 0 above the trust region: clipped, no gradient
    (0.5, 1.0, -0.5, -0.5, None),    # A > 0 below: unclipped (pessimistic min keeps the smaller gain)
    (0.5, -1.0, 0.8, 0.0, "low"),    # A < 0 below the trust region: clipped, no gradient
    (1.5, -1.0, 1.5, 1.5, None),     # A < 0 above: unclipped, full penalty
    (1.1, 1.0, -1.1, -1.1, None),    # inside the region
]


@pytest.mark.parametrize(("ratio", "adv", "loss", "grad", "side"), PPO_CASES)
def test_ppo_clip_on_each_side_of_the_trust_region(ratio, adv, loss, grad, side):
    batch, cfg = _one_token(ratio, adv), PolicyLossConfig(eps_low=0.2, eps_high=0.2)
    assert _loss(policy_loss, batch, cfg) == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(_fd_grad(policy_loss, batch, cfg, "logprobs"), [[grad]], atol=1e-6)
    m = finalize_metrics(policy_loss(batch, cfg)[2])
    assert m["clipfrac"] == (side is not None)
    assert m["clipfrac_high"] == (side == "high") and m["clipfrac_low"] == (side == "low")
    assert m["ratio"] == pytest.approx(ratio)


def test_clip_higher_lets_positive_advantages_grow_further():
    batch = _one_token(1.25, 1.0)
    assert _loss(policy_loss, batch, PolicyLossConfig(eps_high=0.2)) == pytest.approx(-1.2)
    assert _loss(policy_loss, batch, POLICY_PRESETS["dapo"]) == pytest.approx(-1.25)


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    batch = _one_token(5.0, -1.0)
    assert _loss(policy_loss, batch, PolicyLossConfig()) == pytest.approx(5.0)
    cfg = PolicyLossConfig(dual_clip=3.0)
    assert _loss(policy_loss, batch, cfg) == pytest.approx(3.0)
    np.testing.assert_allclose(_fd_grad(policy_loss, batch, cfg, "logprobs"), [[0.0]], atol=1e-6)
    assert finalize_metrics(policy_loss(batch, cfg)[2])["dual_clipfrac"] == 1.0
    # A positive advantage is never dual-clipped.
    assert _loss(policy_loss, _one_token(5.0, 1.0), cfg) == pytest.approx(-1.2)


def test_kl_estimators_by_hand():
    lp, ref = np.log([[0.5]]), np.log([[0.25]])
    d = math.log(0.5)  # ref - lp
    expected = {"k1": -d, "k2": d * d / 2, "k3": 0.5 - d - 1}
    for k, v in expected.items():
        assert float(kl_estimate(lp, ref, k)[0, 0]) == pytest.approx(v, rel=1e-12)
        batch = {**_one_token(1.0, 0.0), "logprobs": lp, "old_logprobs": lp, "ref_logprobs": ref}
        cfg = PolicyLossConfig(beta=0.1, kl_estimator=k)
        assert _loss(policy_loss, batch, cfg) == pytest.approx(0.1 * v, rel=1e-12)
        assert finalize_metrics(policy_loss(batch, cfg)[2])["kl"] == pytest.approx(v)
    # k3's gradient is (1 - pi_ref / pi): zero when the policy equals the reference, unlike k1's.
    same = {**_one_token(1.0, 0.0), "ref_logprobs": np.array([[-1.0]])}
    g3 = _fd_grad(policy_loss, same, PolicyLossConfig(beta=1.0, kl_estimator="k3"), "logprobs")
    g1 = _fd_grad(policy_loss, same, PolicyLossConfig(beta=1.0, kl_estimator="k1"), "logprobs")
    np.testing.assert_allclose(g3, [[0.0]], atol=1e-6)
    np.testing.assert_allclose(g1, [[1.0]], atol=1e-6)


def test_truncated_importance_sampling_caps_the_sampler_correction():
    batch = _one_token(1.0, 1.0, sampler_logprobs=np.array([[-1.0 - math.log(3.0)]]))
    assert _loss(policy_loss, batch, PolicyLossConfig(tis_cap=2.0)) == pytest.approx(-2.0)
    assert _loss(policy_loss, batch, PolicyLossConfig(tis_cap=5.0)) == pytest.approx(-3.0)
    m = finalize_metrics(policy_loss(batch, PolicyLossConfig(tis_cap=2.0))[2])
    assert m["tis_weight"] == pytest.approx(2.0) and m["tis_clipfrac"] == 1.0


def test_entropy_bonus_lowers_the_loss():
    batch = _one_token(1.0, 0.0, entropy=np.array([[2.0]]))
    assert _loss(policy_loss, batch, PolicyLossConfig(entropy_coef=0.01)) == pytest.approx(-0.02)


def test_gspo_ratio_is_the_geometric_mean_over_the_sequence():
    old = np.array([[-1.0, -2.0, -9.0]])
    batch = {"logprobs": old + np.array([[0.1, 0.3, 5.0]]), "old_logprobs": old, "advantages": np.array([1.0]),
             "mask": np.array([[1, 1, 0]])}
    cfg = PolicyLossConfig(ratio_level="sequence", eps_low=0.5, eps_high=0.5, aggregation="seq_mean_token_mean")
    s = math.exp(0.2)
    assert _loss(policy_loss, batch, cfg) == pytest.approx(-s, rel=1e-12)
    np.testing.assert_allclose(_fd_grad(policy_loss, batch, cfg, "logprobs"), [[-s / 2, -s / 2, 0.0]], atol=1e-6)
    # GSPO's tiny trust region clips the whole sequence at once.
    assert _loss(policy_loss, batch, POLICY_PRESETS["gspo"]) == pytest.approx(-(1 + 4e-4))


def _agg_batch() -> dict:
    """Per-token losses (ratio 1, L = -A): row 0 = [1], row 1 = [2, 4, 6]."""
    lp = np.full((2, 3), -1.0)
    return {"logprobs": lp, "old_logprobs": lp, "mask": np.array([[0, 0, 1], [1, 1, 1]]),
            "advantages": -np.array([[9.0, 9.0, 1.0], [2.0, 4.0, 6.0]])}


@pytest.mark.parametrize(("mode", "expected"), [
    ("token_mean", 13 / 4),
    ("seq_mean_token_mean", (1 + 4) / 2),
    ("seq_mean_token_sum", (1 + 12) / 2),
    ("seq_mean_token_sum_norm", 13 / (2 * 4)),
])
def test_aggregation_modes_by_hand(mode, expected):
    cfg = PolicyLossConfig(aggregation=mode, norm_length=4)
    assert _loss(policy_loss, _agg_batch(), cfg) == pytest.approx(expected, rel=1e-12)


def _length_batch(short: int, long: int, adv: float) -> dict:
    T = max(short, long)
    mask = np.zeros((2, T))
    mask[0, T - short:] = 1  # left padding
    mask[1, T - long:] = 1
    lp = np.full((2, T), -0.5)
    return {"logprobs": lp, "old_logprobs": lp, "advantages": np.array([adv, adv]), "mask": mask}


def _per_token_weight(batch, cfg) -> tuple[float, float]:
    g = _fd_grad(policy_loss, batch, cfg, "logprobs")
    return float(g[0, -1]), float(g[1, -1])


def test_length_bias_of_each_aggregation():
    batch = _length_batch(2, 8, adv=1.0)
    # token_mean: every token weighs 1 / total tokens.
    short, long = _per_token_weight(batch, PolicyLossConfig(aggregation="token_mean"))
    assert short == pytest.approx(-1 / 10, abs=1e-6) and long == pytest.approx(-1 / 10, abs=1e-6)
    # seq_mean_token_mean (GRPO): each sequence weighs 1/2 spread over its tokens, so a short sequence's
    # tokens weigh 4x more; with A < 0 long wrong answers are penalised 4x less per token (Dr.GRPO, Sec. 3.1).
    short, long = _per_token_weight(batch, PolicyLossConfig(aggregation="seq_mean_token_mean"))
    assert short == pytest.approx(-1 / 4, abs=1e-6) and long == pytest.approx(-1 / 16, abs=1e-6)
    short, long = _per_token_weight(_length_batch(2, 8, adv=-1.0), PolicyLossConfig(aggregation="seq_mean_token_mean"))
    assert abs(long) == pytest.approx(abs(short) / 4, rel=1e-5)
    # Dr.GRPO: a constant per-token weight 1 / (S * norm_length), whatever the lengths in the batch.
    cfg = PolicyLossConfig(aggregation="seq_mean_token_sum_norm", norm_length=8)
    for short_len in (2, 4):
        short, long = _per_token_weight(_length_batch(short_len, 8, 1.0), cfg)
        assert short == pytest.approx(-1 / 16, abs=1e-6) and long == pytest.approx(-1 / 16, abs=1e-6)
    # ... while token_mean's per-token weight moves with the other sequences' lengths.
    short, _ = _per_token_weight(_length_batch(4, 8, 1.0), PolicyLossConfig(aggregation="token_mean"))
    assert short == pytest.approx(-1 / 12, abs=1e-6)


def test_presets_map_to_the_papers_settings():
    assert set(POLICY_PRESETS) == {"grpo", "dr_grpo", "dapo", "gspo", "bnpo"}
    g = POLICY_PRESETS["grpo"]
    assert (g.beta, g.kl_estimator, g.aggregation) == (0.04, "k3", "seq_mean_token_mean")
    assert POLICY_PRESETS["dr_grpo"].aggregation == "seq_mean_token_sum_norm" and POLICY_PRESETS["dr_grpo"].beta == 0
    d = POLICY_PRESETS["dapo"]
    assert (d.eps_low, d.eps_high, d.aggregation) == (0.2, 0.28, "token_mean")
    assert POLICY_PRESETS["gspo"].ratio_level == "sequence"
    assert POLICY_PRESETS["bnpo"].aggregation == "token_mean"
    assert policy_preset("dr_grpo", norm_length=256).norm_length == 256
    with pytest.raises(ConfigError, match="Unknown policy preset"):
        policy_preset("ppo2")


@pytest.mark.parametrize(("v", "loss", "grad", "clipped"), [
    (1.5, 0.5 * 0.8**2, 0.0, True),   # moved 0.5 from old 1.0, clip keeps 1.2: (1.2 - 2)^2 / 2, no gradient
    (1.1, 0.5 * 0.9**2, -0.9, False),  # inside the clip range
])
def test_value_loss_clipped_by_hand(v, loss, grad, clipped):
    batch = {"values": np.array([[v]]), "old_values": np.array([[1.0]]), "returns": np.array([[2.0]]),
             "mask": np.array([[1]])}
    cfg = ValueLossConfig(clip=0.2)
    assert _loss(value_loss, batch, cfg) == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(_fd_grad(value_loss, batch, cfg, "values"), [[grad]], atol=1e-6)
    assert finalize_metrics(value_loss(batch, cfg)[2])["vf_clipfrac"] == clipped
    assert _loss(value_loss, batch, ValueLossConfig(clip=None)) == pytest.approx(0.5 * (v - 2.0) ** 2)


def _pair() -> dict:
    return {
        "chosen_logprobs": np.array([[-1.0, -2.0, 0.0]]), "chosen_mask": np.array([[1, 1, 0]]),
        "ref_chosen_logprobs": np.array([[-1.5, -2.0, 0.0]]),
        "rejected_logprobs": np.array([[-2.0, -1.0, -3.0]]), "rejected_mask": np.array([[1, 1, 1]]),
        "ref_rejected_logprobs": np.array([[-1.0, -2.0, -2.0]]),
    }


def _ls(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _s(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _preference_expected(kind: str, beta: float, e: float, gamma: float, lam: float) -> float:
    pc, rc, lc, pr, rr, lr = -3.0, -3.5, 2, -6.0, -5.0, 3
    h = beta * ((pc - rc) - (pr - rr))  # 0.15 at beta 0.1
    u = (pc - rc) / lc - (pr - rr) / lr
    if kind == "sigmoid":
        return -(1 - e) * _ls(h) - e * _ls(-h)
    if kind == "robust":
        return (-(1 - e) * _ls(h) + e * _ls(-h)) / (1 - 2 * e)
    if kind == "hinge":
        return max(0.0, 1 - h)
    if kind == "ipo":
        return (u - 1 / (2 * beta)) ** 2
    if kind == "sigmoid_norm":
        return -(1 - e) * _ls(beta * u) - e * _ls(-beta * u)
    if kind == "simpo":
        x = beta * (pc / lc - pr / lr) - gamma
        return -(1 - e) * _ls(x) - e * _ls(-x)
    if kind == "apo_zero":
        return 1 - _s(beta * (pc - rc)) + _s(beta * (pr - rr))
    if kind == "apo_down":
        return _s(beta * (pc - rc)) + 1 - _s(beta * (pc - rc) - beta * (pr - rr))
    if kind == "orpo":
        ac, ar = pc / lc, pr / lr
        log_odds = math.log(math.exp(ac) / (1 - math.exp(ac))) - math.log(math.exp(ar) / (1 - math.exp(ar)))
        return -ac - lam * _ls(log_odds)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["sigmoid", "robust", "hinge", "ipo", "sigmoid_norm", "simpo",
                                  "apo_zero", "apo_down", "orpo"])
def test_preference_losses_by_hand(kind):
    smoothing = 0.1 if kind in ("sigmoid", "robust", "sigmoid_norm", "simpo") else 0.0
    cfg = PreferenceLossConfig(kind=kind, beta=0.1, label_smoothing=smoothing, gamma=0.3, orpo_lambda=0.2)
    expected = _preference_expected(kind, 0.1, smoothing, 0.3, 0.2)
    assert _loss(preference_loss, _pair(), cfg) == pytest.approx(expected, rel=1e-12)
    m = finalize_metrics(preference_loss(_pair(), cfg)[2])
    assert m["rewards_margin"] == pytest.approx(m["rewards_chosen"] - m["rewards_rejected"])
    assert m["rewards_accuracy"] == float(m["rewards_margin"] > 0)


def test_orpo_metrics_follow_trl_names_and_scale():
    """TRL's ORPO logs nll_loss, log_odds_chosen (the log odds ratio) and log_odds_ratio (its log-sigmoid), with
    rewards = lambda * mean log-prob (TRL's ORPO beta is ORPO's lambda); our beta must not enter."""
    ac, ar = -1.5, -2.0  # mean log-probs of _pair()'s chosen (2 tokens) and rejected (3 tokens)
    log_odds = math.log(math.exp(ac) / (1 - math.exp(ac))) - math.log(math.exp(ar) / (1 - math.exp(ar)))
    for beta in (0.1, 5.0):
        m = finalize_metrics(preference_loss(_pair(), PreferenceLossConfig(kind="orpo", beta=beta, orpo_lambda=0.2))[2])
        assert m["nll_loss"] == pytest.approx(-ac)
        assert m["log_odds_chosen"] == pytest.approx(log_odds)
        assert m["log_odds_ratio"] == pytest.approx(_ls(log_odds))
        assert (m["rewards_chosen"], m["rewards_rejected"]) == (pytest.approx(0.2 * ac), pytest.approx(0.2 * ar))
        assert "nll" not in m


def test_dpo_rewards_and_reference_free_kinds_need_no_reference():
    m = finalize_metrics(preference_loss(_pair(), PreferenceLossConfig(kind="sigmoid", beta=0.1))[2])
    assert (m["rewards_chosen"], m["rewards_rejected"]) == (pytest.approx(0.05), pytest.approx(-0.1))
    no_ref = {k: v for k, v in _pair().items() if not k.startswith("ref_")}
    assert math.isfinite(_loss(preference_loss, no_ref, PreferenceLossConfig(kind="simpo")))
    with pytest.raises(LossInputError, match="ref_chosen_logprobs"):
        preference_loss(no_ref, PreferenceLossConfig(kind="sigmoid"))


def test_sft_is_token_mean_nll():
    batch = {"logprobs": np.array([[-1.0, -2.0], [-3.0, -np.inf]]), "mask": np.array([[1, 1], [1, 0]])}
    assert _loss(sft_loss, batch, SFTLossConfig()) == pytest.approx(2.0)
    assert _loss(sft_loss, batch, SFTLossConfig(aggregation="seq_mean_token_mean")) == pytest.approx((1.5 + 3) / 2)


def test_registry():
    from diptych.core.losses import LOSS_SPECS, POLICY_LAYOUT, PREFERENCE_LAYOUT, SFT_LAYOUT, VALUE_LAYOUT

    # other test modules may register more (tests/train/test_register_loss.py adds "cispo")
    assert {"policy", "value", "preference", "sft"} <= set(LOSSES) == set(LOSS_SPECS)
    assert get_loss("policy") is policy_loss
    with pytest.raises(KeyError, match="registered losses"):
        get_loss("dpo")
    layouts = {n: LOSS_SPECS[n].layout for n in ("policy", "value", "preference", "sft")}
    assert layouts == {"policy": POLICY_LAYOUT, "value": VALUE_LAYOUT, "preference": PREFERENCE_LAYOUT,
                       "sft": SFT_LAYOUT}
    assert LOSS_SPECS["policy"].outputs(PolicyLossConfig()) == {"logprobs"}
    assert LOSS_SPECS["policy"].outputs(PolicyLossConfig(entropy_coef=0.01)) == {"logprobs", "entropy"}
    assert LOSS_SPECS["value"].outputs(None) == {"values"}
    assert LOSS_SPECS["preference"].outputs(None) == {"chosen_logprobs", "rejected_logprobs"}
    assert "old_logprobs" in POLICY_LAYOUT.optional and POLICY_LAYOUT.detached_defaults["old_logprobs"] == "logprobs"


# ---- bad input: clear errors, never NaN ----

def _policy_batch(B=2, T=3) -> dict:
    rng = np.random.default_rng(0)
    lp = -rng.random((B, T))
    return {"logprobs": lp, "old_logprobs": lp - 0.1, "advantages": np.ones(B), "mask": np.ones((B, T))}


@pytest.mark.parametrize(("key", "value", "match"), [
    ("old_logprobs", np.zeros((2, 4)), r"old_logprobs.*shape \(2, 4\), expected \(2, 3\)"),
    ("mask", np.ones((3, 3)), r"mask.*expected \(2, 3\)"),
    ("advantages", np.ones(3), r"advantages.*\[2\] or \[2, 3\]"),
    ("mask", np.array([[1, 1, 1], [0, 0, 0]]), r"rows \[1\] have no tokens"),
    ("mask", np.full((2, 3), 0.5), "only 0 and 1"),
    ("old_logprobs", np.array([[np.nan, 0, 0], [0, 0, 0]]), "not finite"),
])
def test_bad_policy_batches_raise_clear_errors(key, value, match):
    with pytest.raises(LossInputError, match=match):
        policy_loss({**_policy_batch(), key: value}, PolicyLossConfig())


def test_missing_optional_inputs_name_the_setting_that_needs_them():
    with pytest.raises(LossInputError, match=r"ref_logprobs.*beta > 0"):
        policy_loss(_policy_batch(), PolicyLossConfig(beta=0.1))
    with pytest.raises(LossInputError, match=r"sampler_logprobs.*tis_cap"):
        policy_loss(_policy_batch(), PolicyLossConfig(tis_cap=2.0))
    with pytest.raises(LossInputError, match=r"entropy.*entropy_coef"):
        policy_loss(_policy_batch(), PolicyLossConfig(entropy_coef=0.1))
    with pytest.raises(LossInputError, match="logprobs"):
        policy_loss({"mask": np.ones((1, 1))}, PolicyLossConfig())


def test_allowed_empty_rows_and_inf_padding_never_give_nan():
    batch = {**_policy_batch(), "mask": np.array([[0, 1, 1], [0, 0, 0]])}
    batch["logprobs"] = batch["logprobs"].copy()
    batch["logprobs"][:, 0] = -np.inf  # padding positions may hold anything
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"):
        cfg = PolicyLossConfig(aggregation=mode, norm_length=3, allow_empty_sequences=True)
        s, d, metrics = policy_loss(batch, cfg)
        assert np.isfinite(s) and np.isfinite(d) and all(np.isfinite(v) for v in metrics.values())
        only_row0 = {k: v[:1] for k, v in batch.items()}
        assert float(s) / float(d) == pytest.approx(_loss(policy_loss, only_row0, cfg))
        assert np.all(np.isfinite(_fd_grad(policy_loss, {**batch, "logprobs": np.where(batch["mask"] > 0,
                                                                                       batch["logprobs"], 0)},
                                           cfg, "logprobs")))
    pair = _pair()
    pair["chosen_mask"] = np.array([[0, 0, 0]])
    with pytest.raises(LossInputError, match="no tokens"):
        preference_loss(pair, PreferenceLossConfig())
    s, d, _ = preference_loss(pair, PreferenceLossConfig(allow_empty_sequences=True))
    assert float(s) == 0.0 and float(d) == 0.0


def test_a_zero_denominator_is_an_error_at_the_single_division():
    with pytest.raises(LossInputError, match="denominator is 0"):
        reduce_loss(np.float64(0.0), np.float64(0.0))
    assert float(reduce_loss(np.float64(3.0), np.float64(2.0))) == 1.5


def test_preference_pairs_must_line_up():
    pair = _pair()
    pair["rejected_logprobs"] = np.zeros((2, 3))
    pair["rejected_mask"] = np.ones((2, 3))
    pair["ref_rejected_logprobs"] = np.zeros((2, 3))
    with pytest.raises(LossInputError, match="differ in size"):
        preference_loss(pair, PreferenceLossConfig())


@pytest.mark.parametrize(("cls", "kw", "match"), [
    (PolicyLossConfig, {"eps_low": 1.5}, "eps_low"),
    (PolicyLossConfig, {"dual_clip": 0.5}, "dual_clip"),
    (PolicyLossConfig, {"aggregation": "mean"}, "aggregation must be one of"),
    (PolicyLossConfig, {"aggregation": "seq_mean_token_sum_norm"}, "norm_length"),
    (PolicyLossConfig, {"kl_estimator": "k4"}, "kl_estimator"),
    (PreferenceLossConfig, {"kind": "dpo"}, "kind must be one of"),
    (PreferenceLossConfig, {"kind": "hinge", "label_smoothing": 0.1}, "no effect"),
    (ValueLossConfig, {"clip": -1.0}, "clip"),
])
def test_bad_configs_raise(cls, kw, match):
    with pytest.raises(ConfigError, match=match):
        cls(**kw)


def test_configs_load_from_dicts_with_typo_suggestions():
    cfg = from_dict(PolicyLossConfig, {"eps_high": "0.28", "aggregation": "token_mean"})
    assert cfg == dataclasses.replace(PolicyLossConfig(), eps_high=0.28)
    with pytest.raises(ConfigError, match="eps_high"):
        from_dict(PolicyLossConfig, {"eps_hihg": 0.3})


def test_non_finite_model_output_reaches_the_loss_as_nan_but_bad_data_raises():
    """A diverged model (NaN log-probs) must give a NaN loss for the train step to skip; NaN data is an error."""
    from diptych.core.losses import PolicyLossConfig, SFTLossConfig, get_loss
    from diptych.core.losses.common import LossInputError

    mask = np.array([[1.0, 1.0], [1.0, 0.0]], np.float32)
    lp = np.array([[-1.0, np.nan], [-2.0, -np.inf]], np.float32)
    s, d, _ = get_loss("sft")({"logprobs": lp, "mask": mask}, SFTLossConfig())
    assert np.isnan(float(s)) and float(d) == 3.0
    with pytest.raises(LossInputError, match="not finite"):
        get_loss("policy")({"logprobs": np.zeros((2, 2), np.float32), "old_logprobs": lp, "mask": mask,
                            "advantages": np.ones(2, np.float32)}, PolicyLossConfig())
