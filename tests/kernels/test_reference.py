"""The numpy oracle itself checked against hand-computed values and central finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.kernels import reference as ref


def _case(n=7, h=5, v=11, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, h)), rng.normal(size=(v, h)) * 0.7, rng.integers(0, v, size=n)


def test_uniform_logits_give_minus_log_v_and_log_v_entropy():
    h, w, y = np.ones((3, 4)), np.zeros((10, 4)), np.array([0, 4, 9])
    logp, ent = ref.selective_logprobs(h, w, y)
    np.testing.assert_allclose(logp, -np.log(10.0))
    np.testing.assert_allclose(ent, np.log(10.0))


def test_temperature_divides_the_logits():
    h, w, y = _case()
    a = ref.selective_logprobs(h, w, y, temperature=2.0)
    b = ref.selective_logprobs(h, w / 2.0, y, temperature=1.0)
    np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprob_gradients_match_finite_differences(temperature):
    h, w, y = _case()
    rng = np.random.default_rng(1)
    g_lp, g_ent = rng.normal(size=len(y)), rng.normal(size=len(y))

    def objective(h_, w_):
        lp, e = ref.selective_logprobs(h_, w_, y, temperature)
        return float((g_lp * lp + g_ent * e).sum())

    # The oracle rounds its inputs to float32, so finite differences need a float64 path:
    # evaluate on float32-representable perturbations of size 2^-10 and compare loosely.
    dh, dw = ref.selective_logprobs_backward(h, w, y, temperature, g_lp, g_ent)
    eps = 2.0 ** -10
    for arr, grad, which in ((h, dh, "h"), (w, dw, "w")):
        for idx in [(0, 0), (3, 2), (arr.shape[0] - 1, arr.shape[1] - 1)]:
            plus, minus = arr.astype(np.float32).copy(), arr.astype(np.float32).copy()
            plus[idx] += eps
            minus[idx] -= eps
            args_p = (plus, w) if which == "h" else (h, plus)
            args_m = (minus, w) if which == "h" else (h, minus)
            fd = (objective(*args_p) - objective(*args_m)) / (2 * eps)
            assert abs(fd - grad[idx]) < 1e-4 * max(1.0, abs(fd)), (which, idx, fd, grad[idx])


def test_rms_norm_matches_hand_computation():
    x = np.array([[3.0, 4.0]])
    y = ref.rms_norm(x, np.array([1.0, 2.0]), eps=0.0)
    rms = np.sqrt((9 + 16) / 2)
    np.testing.assert_allclose(y, [[3 / rms, 8 / rms]], rtol=1e-12)


def test_rms_norm_gradients_match_finite_differences():
    rng = np.random.default_rng(2)
    x, w, go = rng.normal(size=(4, 6)), rng.normal(size=6), rng.normal(size=(4, 6))
    dx, dw = ref.rms_norm_backward(x, w, 1e-6, go)
    eps = 2.0 ** -10
    for arr, grad, which in ((x, dx, "x"), (w, dw, "w")):
        for idx in ([(1, 3), (0, 0)] if which == "x" else [(2,), (5,)]):
            plus, minus = arr.astype(np.float32).copy(), arr.astype(np.float32).copy()
            plus[idx] += eps
            minus[idx] -= eps
            f = lambda a, which=which: float(
                (go * (ref.rms_norm(a, w, 1e-6) if which == "x" else ref.rms_norm(x, a, 1e-6))).sum())
            fd = (f(plus) - f(minus)) / (2 * eps)
            assert abs(fd - grad[idx]) < 1e-4 * max(1.0, abs(fd)), (which, idx, fd, grad[idx])


def test_bad_shapes_raise_clear_errors():
    h, w, y = _case()
    with pytest.raises(ValueError, match="transpose"):
        ref.selective_logprobs(h, w.T, y)
    with pytest.raises(ValueError, match="targets must lie"):
        ref.selective_logprobs(h, w, y + 100)
