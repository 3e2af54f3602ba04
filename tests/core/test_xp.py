"""The Array API helpers agree with numpy references on numpy, jax.numpy and torch arrays."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from diptych.core import xp as X

LIBS = ["numpy"] + [lib for lib in ("torch", "jax") if importlib.util.find_spec(lib)]


def _to(lib: str, a: np.ndarray):
    if lib == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(a))
    if lib == "jax":
        import jax.numpy as jnp

        return jnp.asarray(a)
    return a


def _np(x) -> np.ndarray:
    return np.asarray(x.detach() if hasattr(x, "detach") else x)


def _ref_logsumexp(a: np.ndarray, axis) -> np.ndarray:
    a = a.astype(np.float64)
    return np.log(np.sum(np.exp(a), axis=axis))


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("axis", [-1, 0, None])
def test_logsumexp_matches_the_definition(lib, axis):
    a = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    out = _np(X.logsumexp(_to(lib, a), axis=axis))
    np.testing.assert_allclose(out, _ref_logsumexp(a, axis), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.filterwarnings("ignore:divide by zero")
def test_logsumexp_does_not_overflow_and_handles_all_minus_inf_rows(lib):
    a = np.array([[1000.0, 1000.0], [-np.inf, -np.inf]], np.float32)
    out = _np(X.logsumexp(_to(lib, a), axis=-1, keepdims=True))
    assert out.shape == (2, 1)
    np.testing.assert_allclose(out[0, 0], 1000.0 + np.log(2.0), rtol=1e-6)
    assert out[1, 0] == -np.inf


@pytest.mark.parametrize("lib", LIBS)
def test_log_softmax_normalises_and_is_shift_invariant(lib):
    a = np.random.default_rng(1).normal(size=(2, 7)).astype(np.float32) * 30
    out = _np(X.log_softmax(_to(lib, a)))
    np.testing.assert_allclose(np.exp(out).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out, _np(X.log_softmax(_to(lib, a + 50.0))), atol=2e-5)


@pytest.mark.parametrize("lib", LIBS)
def test_log_sigmoid_and_sigmoid_are_finite_at_extremes(lib):
    a = np.array([-200.0, -1.0, 0.0, 1.0, 200.0], np.float32)
    ls = _np(X.log_sigmoid(_to(lib, a)))
    np.testing.assert_allclose(ls, -np.logaddexp(0, -a.astype(np.float64)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_np(X.sigmoid(_to(lib, a))), 1 / (1 + np.exp(-a.astype(np.float64))), atol=1e-7)


@pytest.mark.parametrize("lib", LIBS)
def test_masked_sum_mean_var(lib):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(3, 4)).astype(np.float32)
    m = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.float32)
    s = _np(X.masked_sum(_to(lib, a), _to(lib, m), axis=-1))
    mean = _np(X.masked_mean(_to(lib, a), _to(lib, m), axis=-1))
    var = _np(X.masked_var(_to(lib, a), _to(lib, m), axis=-1, ddof=1))
    np.testing.assert_allclose(s, [a[0, :2].sum(), a[1].sum(), 0.0], rtol=1e-6)
    # An empty row gives 0, not nan.
    np.testing.assert_allclose(mean, [a[0, :2].mean(), a[1].mean(), 0.0], rtol=1e-6)
    np.testing.assert_allclose(var[:2], [np.var(a[0, :2], ddof=1), np.var(a[1], ddof=1)], rtol=1e-5)
    assert np.all(np.isfinite(var))


def test_as_like_moves_numpy_next_to_the_reference_array_and_refuses_mixed_frameworks():
    torch = pytest.importorskip("torch")
    like = torch.zeros(2, dtype=torch.float32)
    out = X.as_like(np.array([1, 0], dtype=np.int64), like)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(TypeError, match="Cannot mix array libraries"):
        X.as_like(jnp.ones(2), like)


def test_is_concrete_is_false_only_under_jax_tracing():
    jax = pytest.importorskip("jax")
    seen = []
    jax.jit(lambda x: seen.append(X.is_concrete(x)) or x)(jax.numpy.ones(2))
    assert seen == [False]
    assert X.is_concrete(np.ones(2)) and X.is_concrete(jax.numpy.ones(2))


def test_upcast_lifts_bf16_to_float32_so_small_log_ratios_survive():
    torch = pytest.importorskip("torch")
    from diptych.core.losses import PolicyLossConfig, finalize_metrics, policy_loss

    assert X.upcast(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32
    assert X.upcast(np.ones(2, np.float64)).dtype == np.float64
    lp = torch.full((1, 2), -1.0, dtype=torch.bfloat16, requires_grad=True)
    batch = {"logprobs": lp, "old_logprobs": np.full((1, 2), -1.001), "advantages": np.ones(1), "mask": np.ones((1, 2))}
    s, d, m = policy_loss(batch, PolicyLossConfig())
    # In bf16, exp(0.001) rounds to 1; in float32 the ratio keeps its 1e-3.
    assert finalize_metrics(m)["ratio"] == pytest.approx(np.exp(0.001), rel=1e-6)
    (s / d).backward()
    assert lp.grad.dtype == torch.bfloat16
