"""A loss registered in one decorated function trains on both backends: CISPO (MiniMax-M1, 2025).

    L = -sum_t m_t sg(min(r_t, 1 + eps_high_is)) A_t logp_t / sum_t m_t,   r_t = exp(logp_t - logp_old_t)

The clipped IS weight is held constant through ``detached_logprobs`` (the step's stop-gradient), so the
gradient flows only through ``logp``: every token keeps a gradient, unlike PPO's clip, which drops it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from diptych.core import xp as X
from diptych.core.losses import POLICY_LAYOUT, SFTLossConfig, loss_spec, register_loss, unregister_loss
from diptych.core.losses.common import aggregate, token_metric
from diptych.core.train_batch import BatchError, validate_microbatch

from . import batches
from .helpers import BACKENDS, mods, rel_err, state


@dataclasses.dataclass(frozen=True)
class CISPOConfig:
    eps_high_is: float = 0.05


@register_loss("cispo", config=CISPOConfig, layout=POLICY_LAYOUT, needs=("logprobs", "detached_logprobs"))
def cispo_loss(batch, cfg):
    lp = X.upcast(batch["logprobs"])
    xp = X.namespace(lp)
    mask = X.as_like(batch["mask"], lp)
    adv = X.as_like(batch["advantages"], lp)
    if adv.ndim == 1:
        adv = xp.broadcast_to(adv[:, None], lp.shape)
    ratio = xp.exp(X.as_like(batch["detached_logprobs"], lp) - X.as_like(batch["old_logprobs"], lp))
    weight = xp.minimum(ratio, xp.full_like(ratio, 1.0 + cfg.eps_high_is))
    total, denom = aggregate(-weight * adv * lp, mask, "token_mean")
    metrics = {}
    token_metric(metrics, "is_clipfrac", xp.astype(ratio > 1.0 + cfg.eps_high_is, lp.dtype), mask)
    return total, denom, metrics


@pytest.fixture(scope="module", autouse=True)
def _unregister_at_the_end():
    yield
    unregister_loss("cispo")


def _own_logprobs(backend, st, batch):
    tok, am = batch["tokens"], batch["attention_mask"]
    lp = mods(backend)[0].logprobs(st.model, tok[:, :-1], am[:, :-1], tok[:, 1:])
    return np.asarray(lp.detach().numpy() if hasattr(lp, "detach") else lp, np.float64)


def _cispo_numpy(lp, old, adv, mask, eps):
    w = np.minimum(np.exp(lp - old), 1.0 + eps)
    return float(np.sum(-w * adv[:, None] * lp * mask) / np.sum(mask))


def _rollouts(backend_for_lp, st, steps=3):
    """Deterministic batches whose old log-probs sit near the model's, so some IS weights clip."""
    out = []
    for step in range(steps):
        b = batches.grpo_batch(seed=step, b=4, beta=0.0)
        own = _own_logprobs(backend_for_lp, st, b)
        noise = 0.1 * np.random.default_rng(100 + step).standard_normal(own.shape)
        out.append({**b, "old_logprobs": (own + noise).astype(np.float32)})
    return out


def test_registration_states_its_contract():
    spec = loss_spec("cispo")
    assert spec.config is CISPOConfig and spec.layout is POLICY_LAYOUT
    assert spec.outputs(CISPOConfig()) == {"logprobs", "detached_logprobs"}
    good = batches.grpo_batch(b=2, beta=0.0)
    validate_microbatch(good, ["cispo"])
    with pytest.raises(BatchError, match="lacks advantages"):
        validate_microbatch({k: v for k, v in good.items() if k != "advantages"}, ["cispo"])
    with pytest.raises(TypeError, match="needs layout="):
        register_loss("half_registered", CISPOConfig)
    with pytest.raises(ValueError, match="unknown model outputs"):
        register_loss("bad", config=CISPOConfig, layout=POLICY_LAYOUT, needs=("hidden",))


def test_cispo_trains_the_same_on_both_backends_and_matches_numpy():
    pytest.importorskip("jax")
    pytest.importorskip("torch")
    from diptych.core.optim import OptimConfig

    optim, cfg = OptimConfig(lr=1e-2, max_grad_norm=0.0), CISPOConfig(eps_high_is=0.05)
    spec = batches.spec()
    rollouts = _rollouts("torch", state("torch", spec, optim))
    first = rollouts[0]
    lp0 = _own_logprobs("torch", state("torch", spec, optim), first)
    want0 = _cispo_numpy(lp0, first["old_logprobs"], first["advantages"], first["mask"], cfg.eps_high_is)
    assert 0.0 < float(np.mean((np.exp(lp0 - first["old_logprobs"]) > 1.05)[first["mask"] > 0])) < 1.0

    weights, losses = {}, {}
    for backend in ("jax", "torch"):
        st, train = state(backend, spec, optim), mods(backend)[1]
        losses[backend] = []
        for mb in rollouts:
            st, m = train.train_step(st, [mb], "cispo", cfg)
            assert m["skipped"] == 0.0 and "is_clipfrac" in m
            losses[backend].append(m["loss"])
        weights[backend] = train.export_weights(st)
    assert losses["jax"][0] == pytest.approx(want0, rel=1e-4)
    assert losses["torch"][0] == pytest.approx(want0, rel=1e-4)
    np.testing.assert_allclose(losses["jax"], losses["torch"], rtol=1e-4)
    assert rel_err(weights["jax"], weights["torch"]) < 1e-4
    assert rel_err(weights["torch"], spec.init_weights(0)) > 1e-3  # it did train


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_is_weight_carries_no_gradient(backend):
    """With old = the model's own log-probs the weight is 1 and A = 1, so CISPO's gradient is SFT's token-mean NLL
    gradient; had the weight kept its gradient, d(r logp) = (1 + logp) dlogp would differ."""
    from diptych.core.optim import OptimConfig

    st, train = state(backend, batches.spec(), OptimConfig()), mods(backend)[1]
    b = batches.grpo_batch(seed=5, b=4, beta=0.0)
    mb = {**b, "old_logprobs": _own_logprobs(backend, st, b).astype(np.float32), "advantages": np.ones(4, np.float32)}
    g_cispo, _ = train.gradients(st, [mb], "cispo", CISPOConfig())
    sft = {k: mb[k] for k in ("tokens", "attention_mask", "mask")}
    g_sft, _ = train.gradients(st, [sft], "sft", SFTLossConfig())
    assert rel_err(g_cispo, g_sft) < 1e-4
