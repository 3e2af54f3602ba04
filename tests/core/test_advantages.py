"""Advantage estimators against hand-computed values and independent reference formulas."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core.advantages import (
    ADVANTAGES,
    compute_advantages,
    filter_zero_variance_groups,
    gae,
    kl_shaped_rewards,
    whiten,
)


def test_registry_names():
    assert {"grpo", "dr_grpo", "rloo", "gae", "reinforce_pp"} <= set(ADVANTAGES)
    with pytest.raises(KeyError, match="registered"):
        compute_advantages("grpoo", [0.0, 1.0], 2)


def test_grpo_group_0001_by_hand():
    # mean 0.25; Bessel std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5.
    adv = compute_advantages("grpo", [0, 0, 0, 1], 4, eps=0.0)
    np.testing.assert_allclose(adv, [-0.5, -0.5, -0.5, 1.5], rtol=1e-7)
    # Default eps 1e-6 shrinks by 0.5 / (0.5 + 1e-6).
    expected = np.array([-0.5, -0.5, -0.5, 1.5]) / 1.000002
    np.testing.assert_allclose(compute_advantages("grpo", [0, 0, 0, 1], 4), expected, rtol=1e-7)
    # Population std (ddof=0) is sqrt(3) / 4.
    np.testing.assert_allclose(compute_advantages("grpo", [0, 0, 0, 1], 4, eps=0.0, ddof=0),
                               np.array([-0.25, -0.25, -0.25, 0.75]) / (np.sqrt(3) / 4), rtol=1e-6)


def test_grpo_scales_per_group_batch_or_not_at_all():
    r = np.array([0.0, 1.0, 0.0, 3.0])
    np.testing.assert_allclose(compute_advantages("grpo", r, 2, scale="none"), [-0.5, 0.5, -1.5, 1.5])
    # Group stds (ddof=1): sqrt(0.5) and sqrt(4.5).
    np.testing.assert_allclose(compute_advantages("grpo", r, 2, eps=0.0),
                               [-0.5 / np.sqrt(0.5), 0.5 / np.sqrt(0.5), -1.5 / np.sqrt(4.5), 1.5 / np.sqrt(4.5)],
                               rtol=1e-6)
    batch_std = np.std(r, ddof=1)
    np.testing.assert_allclose(compute_advantages("grpo", r, 2, scale="batch", eps=0.0),
                               np.array([-0.5, 0.5, -1.5, 1.5]) / batch_std, rtol=1e-6)


def test_identical_rewards_give_zero_advantage_not_nan():
    for name in ("grpo", "dr_grpo", "rloo"):
        adv = compute_advantages(name, [1.0, 1.0, 1.0, 0.0, 0.0, 0.0], 3)
        np.testing.assert_array_equal(adv, np.zeros(6, np.float32))


def test_dr_grpo_and_rloo_by_hand():
    np.testing.assert_allclose(compute_advantages("dr_grpo", [0, 0, 0, 1], 4), [-0.25, -0.25, -0.25, 0.75])
    # Leave-one-out: 0 - 1/3 for the three zeros, 1 - 0 for the one.
    np.testing.assert_allclose(compute_advantages("rloo", [0, 0, 0, 1], 4), [-1 / 3, -1 / 3, -1 / 3, 1.0], rtol=1e-6)


def test_rloo_equals_the_explicit_leave_one_out_mean():
    r = np.random.default_rng(0).normal(size=12)
    expected = [r[i] - np.mean(np.delete(r[(i // 4) * 4:(i // 4) * 4 + 4], i % 4)) for i in range(12)]
    np.testing.assert_allclose(compute_advantages("rloo", r, 4), expected, rtol=1e-5)


def test_reinforce_pp_whitens_over_the_batch():
    r = np.array([1.0, 2.0, 3.0, 6.0])
    adv = compute_advantages("reinforce_pp", r, 2, eps=0.0)
    np.testing.assert_allclose(adv, (r - 3.0) / np.std(r, ddof=1), rtol=1e-6)
    base = compute_advantages("reinforce_pp", r, 2, baseline="group", eps=0.0)
    centred = np.array([-0.5, 0.5, -1.5, 1.5])
    np.testing.assert_allclose(base, centred / np.std(centred, ddof=1), rtol=1e-6)


def _gae_oracle(r, v, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l} over one unpadded sequence, V after the end = 0."""
    T = len(r)
    v_next = np.append(v[1:], 0.0)
    delta = r + gamma * v_next - v
    return np.array([sum((gamma * lam) ** k * delta[t + k] for k in range(T - t)) for t in range(T)])


def test_gae_by_hand():
    # gamma 0.5, lam 0.5, V = [1, 1], r = [0, 2]: delta = [0 + 0.5 - 1, 2 - 1] = [-0.5, 1]; A = [-0.5 + 0.25, 1].
    adv, ret = gae([[0.0, 2.0]], [[1.0, 1.0]], None, gamma=0.5, lam=0.5)
    np.testing.assert_allclose(adv, [[-0.25, 1.0]])
    np.testing.assert_allclose(ret, [[0.75, 2.0]])


def test_gae_matches_the_sum_of_discounted_deltas_with_any_padding():
    rng = np.random.default_rng(1)
    r, v = rng.normal(size=5), rng.normal(size=5)
    expected = _gae_oracle(r, v, 0.9, 0.8)
    right = gae(np.r_[r, 0, 0][None], np.r_[v, 9, 9][None], np.r_[np.ones(5), 0, 0][None], 0.9, 0.8)[0][0]
    left = gae(np.r_[0, 0, r][None], np.r_[9, 9, v][None], np.r_[0, 0, np.ones(5)][None], 0.9, 0.8)[0][0]
    np.testing.assert_allclose(right[:5], expected, rtol=1e-10)
    np.testing.assert_allclose(left[2:], expected, rtol=1e-10)
    assert np.all(right[5:] == 0) and np.all(left[:2] == 0)
    # gamma = lam = 1: advantage is reward-to-go minus value.
    adv1 = gae(r[None], v[None], None, 1.0, 1.0)[0][0]
    np.testing.assert_allclose(adv1, np.cumsum(r[::-1])[::-1] - v, rtol=1e-10)


def test_gae_whitening_is_over_masked_tokens():
    rng = np.random.default_rng(2)
    r, v = rng.normal(size=(2, 4)), rng.normal(size=(2, 4))
    m = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], float)
    raw, ret = gae(r, v, m, 1.0, 0.95)
    white, ret_w = gae(r, v, m, 1.0, 0.95, whiten_advantages=True)
    vals = white[m > 0]
    np.testing.assert_allclose([vals.mean(), vals.std(ddof=1)], [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(ret_w, ret)  # returns come from the raw advantages
    assert white[0, 3] == 0.0
    np.testing.assert_allclose(whiten(raw, m), white)


def test_kl_shaped_rewards_put_the_outcome_on_the_last_token():
    out = kl_shaped_rewards([1.0, 2.0], [[-1.0, -1.0, -2.0], [-1.0, -1.0, 0.0]],
                            [[-1.0, -2.0, -2.0], [-1.0, -1.5, 0.0]], [[0, 1, 1], [1, 1, 0]], kl_coef=0.1)
    np.testing.assert_allclose(out, [[0.0, -0.1, 1.0], [0.0, -0.05 + 2.0, 0.0]])


def test_filter_zero_variance_groups_reports_what_it_dropped():
    keep, dropped = filter_zero_variance_groups([1, 1, 0, 1, 0, 0, 0.5, 0.5], 2)
    np.testing.assert_array_equal(keep, [False, False, True, True, False, False, False, False])
    assert dropped == 3
    keep, dropped = filter_zero_variance_groups([0.0, 1e-9, 1.0, 0.0], 2, atol=1e-6)
    assert dropped == 1 and keep.tolist() == [False, False, True, True]


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_a_group_size_that_does_not_divide_the_batch_is_a_clear_error(name):
    with pytest.raises(ValueError, match="does not divide"):
        compute_advantages(name, [0.0, 1.0, 1.0, 0.0, 1.0], 2)
    with pytest.raises(ValueError, match="does not divide"):
        filter_zero_variance_groups([0.0, 1.0, 1.0], 2)


def test_bad_rewards_are_clear_errors():
    with pytest.raises(ValueError, match="NaN"):
        compute_advantages("grpo", [0.0, np.nan], 2)
    with pytest.raises(ValueError, match="shape"):
        compute_advantages("grpo", [[0.0, 1.0]], 2)
    with pytest.raises(ValueError, match="positive integer"):
        compute_advantages("grpo", [0.0, 1.0], 0)
    with pytest.raises(ValueError, match="scale='none'"):
        compute_advantages("grpo", [0.0, 1.0], 1)
    with pytest.raises(ValueError, match="rloo needs group_size >= 2"):
        compute_advantages("rloo", [0.0, 1.0], 1)
    with pytest.raises(ValueError, match="scale must be"):
        compute_advantages("grpo", [0.0, 1.0], 2, scale="sequence")
    with pytest.raises(ValueError, match="shape"):
        gae([[0.0, 1.0]], [[0.0]], None)
