"""The same inputs through numpy, jax.numpy and torch give the same losses, metrics and gradients.

Values: fp32 on all three libraries, within 1e-6. Gradients: jax.grad against torch autograd in
fp32, and torch autograd in fp64 against central finite differences computed with numpy alone, so
each backend's gradient is checked against an oracle that shares none of its machinery.
"""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core.losses import (
    PolicyLossConfig,
    PreferenceLossConfig,
    SFTLossConfig,
    ValueLossConfig,
    get_loss,
)

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
torch = pytest.importorskip("torch")


def _mask(rng, B, T) -> np.ndarray:
    lengths = rng.integers(1, T + 1, size=B)
    return (np.arange(T)[None, :] >= (T - lengths)[:, None]).astype(np.float64)  # left padding


def policy_batch(seed: int, B: int = 4, T: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    lp = -rng.random((B, T)) * 2 - 0.05
    return {
        "logprobs": lp,
        "old_logprobs": lp + rng.normal(size=(B, T)) * 0.3,
        "ref_logprobs": lp + rng.normal(size=(B, T)) * 0.3,
        "sampler_logprobs": lp + rng.normal(size=(B, T)) * 0.5,
        "advantages": rng.normal(size=B),
        "entropy": rng.random((B, T)),
        "mask": _mask(rng, B, T),
    }


def token_adv_batch(seed: int) -> dict:
    b = policy_batch(seed)
    b["advantages"] = np.random.default_rng(seed + 100).normal(size=b["logprobs"].shape)
    return b


def value_batch(seed: int, B: int = 3, T: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(B, T))
    return {"values": v, "old_values": v + rng.normal(size=(B, T)) * 0.3, "returns": rng.normal(size=(B, T)),
            "mask": _mask(rng, B, T)}


def preference_batch(seed: int, B: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for side, T in (("chosen", 4), ("rejected", 5)):
        lp = -rng.random((B, T)) * 2 - 0.05
        out[f"{side}_logprobs"] = lp
        out[f"ref_{side}_logprobs"] = lp + rng.normal(size=(B, T)) * 0.4
        out[f"{side}_mask"] = _mask(rng, B, T)
    return out


def sft_batch(seed: int) -> dict:
    b = policy_batch(seed)
    return {"logprobs": b["logprobs"], "mask": b["mask"]}


P = PolicyLossConfig
CASES = [
    ("policy", P(aggregation="token_mean"), policy_batch, "logprobs"),
    ("policy", P(aggregation="seq_mean_token_mean"), policy_batch, "logprobs"),
    ("policy", P(aggregation="seq_mean_token_sum"), token_adv_batch, "logprobs"),
    ("policy", P(aggregation="seq_mean_token_sum_norm", norm_length=7), policy_batch, "logprobs"),
    ("policy", P(eps_high=0.28, dual_clip=3.0, beta=0.05, kl_estimator="k3", entropy_coef=0.01, tis_cap=2.0),
     policy_batch, "logprobs"),
    ("policy", P(beta=0.1, kl_estimator="k2"), token_adv_batch, "logprobs"),
    ("policy", P(beta=0.1, kl_estimator="k1"), policy_batch, "logprobs"),
    ("policy", P(ratio_level="sequence", eps_low=0.05, eps_high=0.06, aggregation="seq_mean_token_mean"),
     policy_batch, "logprobs"),
    ("value", ValueLossConfig(clip=0.2), value_batch, "values"),
    ("value", ValueLossConfig(clip=None), value_batch, "values"),
    ("sft", SFTLossConfig(), sft_batch, "logprobs"),
    *[("preference", PreferenceLossConfig(kind=k, beta=0.5, label_smoothing=0.1), preference_batch, "chosen_logprobs")
      for k in ("sigmoid", "robust", "sigmoid_norm", "simpo")],
    *[("preference", PreferenceLossConfig(kind=k, beta=0.5), preference_batch, "rejected_logprobs")
      for k in ("ipo", "hinge", "apo_zero", "apo_down", "orpo")],
]
IDS = [f"{name}-{getattr(cfg, 'kind', '')}{getattr(cfg, 'aggregation', '')}-{i}" for i, (name, cfg, _, _) in
       enumerate(CASES)]


def _np_eval(name, cfg, batch):
    s, d, m = get_loss(name)({k: v.astype(np.float32) for k, v in batch.items()}, cfg)
    return float(s) / float(d), {k: float(v) for k, v in m.items()}


def _jax_eval(name, cfg, batch, key):
    arrays = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in batch.items()}

    def f(x):
        s, d, m = get_loss(name)({**arrays, key: x}, cfg)
        return s / d, m

    (value, metrics), grad = jax.value_and_grad(f, has_aux=True)(arrays[key])
    return float(value), {k: float(v) for k, v in metrics.items()}, np.asarray(grad)


def _torch_eval(name, cfg, batch, key, dtype=torch.float32):
    arrays = {k: torch.tensor(v, dtype=dtype) for k, v in batch.items()}
    arrays[key].requires_grad_(True)
    s, d, m = get_loss(name)(arrays, cfg)
    value = s / d
    value.backward()
    return float(value.detach()), {k: float(v.detach()) for k, v in m.items()}, arrays[key].grad.numpy()


def _fd_grad(name, cfg, batch, key, h=1e-6) -> np.ndarray:
    fn = get_loss(name)
    x = batch[key].astype(np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        vals = []
        for step in (h, -h):
            xi = x.copy()
            xi[i] += step
            s, d, _ = fn({**batch, key: xi}, cfg)
            vals.append(float(s) / float(d))
        grad[i] = (vals[0] - vals[1]) / (2 * h)
    return grad


@pytest.mark.parametrize(("name", "cfg", "make", "key"), CASES, ids=IDS)
def test_numpy_jax_torch_agree_on_values_metrics_and_gradients(name, cfg, make, key):
    batch = make(3)
    v_np, m_np = _np_eval(name, cfg, batch)
    v_jax, m_jax, g_jax = _jax_eval(name, cfg, batch, key)
    v_torch, m_torch, g_torch = _torch_eval(name, cfg, batch, key)
    assert np.isfinite(v_np)
    np.testing.assert_allclose([v_jax, v_torch], [v_np, v_np], rtol=1e-6, atol=1e-6)
    assert m_np.keys() == m_jax.keys() == m_torch.keys()
    for k in m_np:
        np.testing.assert_allclose([m_jax[k], m_torch[k]], [m_np[k], m_np[k]], rtol=1e-6, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(g_jax, g_torch, rtol=1e-5, atol=1e-6)
    assert np.abs(g_torch).max() > 0  # the case exercises a gradient at all
    if name == "policy":
        assert 0 < m_np["clipfrac"] < m_np["clipfrac_count"]  # both sides of the clip are exercised


@pytest.mark.parametrize(("name", "cfg", "make", "key"), CASES, ids=IDS)
def test_torch_fp64_gradients_match_numpy_finite_differences(name, cfg, make, key):
    batch = make(5)
    _, _, g_torch = _torch_eval(name, cfg, batch, key, dtype=torch.float64)
    np.testing.assert_allclose(g_torch, _fd_grad(name, cfg, batch, key), rtol=1e-5, atol=1e-7)


def test_policy_loss_jits_under_jax_with_numpy_constants():
    batch = policy_batch(7)
    cfg = PolicyLossConfig(beta=0.04, aggregation="seq_mean_token_mean")
    consts = {k: v.astype(np.float32) for k, v in batch.items() if k != "logprobs"}

    def f(lp):
        s, d, _ = get_loss("policy")({**consts, "logprobs": lp}, cfg)  # numpy constants next to a tracer
        return s / d

    lp = jnp.asarray(batch["logprobs"], dtype=jnp.float32)
    v_jit, g_jit = jax.jit(jax.value_and_grad(f))(lp)
    v_eager, g_eager = jax.value_and_grad(f)(lp)
    np.testing.assert_allclose(float(v_jit), float(v_eager), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_jit), np.asarray(g_eager), rtol=1e-5, atol=1e-7)


def test_traced_masks_next_to_concrete_constants_do_not_break_under_jit():
    batch = policy_batch(8)
    cfg = PolicyLossConfig()
    consts = {k: v.astype(np.float32) for k, v in batch.items() if k not in ("logprobs", "mask")}

    @jax.jit
    def f(lp, mask):
        s, d, _ = get_loss("policy")({**consts, "logprobs": lp, "mask": mask}, cfg)
        return s / d

    lp, mask = batch["logprobs"].astype(np.float32), batch["mask"].astype(np.float32)
    expected, _ = _np_eval("policy", cfg, {**batch})
    np.testing.assert_allclose(float(f(jnp.asarray(lp), jnp.asarray(mask))), expected, rtol=1e-6)
