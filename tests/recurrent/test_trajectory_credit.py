"""Latent-trajectory credit (RLTT): the ``trajectory`` loss against plain GRPO, a numpy oracle and the other backend."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core.backend import get_backend
from diptych.core.config import ConfigError
from diptych.core.losses import LossInputError, PolicyLossConfig, TrajectoryCredit, TrajectoryLossConfig, get_loss
from diptych.core.losses.trajectory import iteration_weights
from diptych.core.optim import OptimConfig
from diptych.core.spec import tiny_spec
from diptych.core.train_step import StepError
from diptych.core.trainers.base import TrainerError
from diptych.core.trainers.grpo import GRPOConfig
from tests.conftest import BACKENDS, needs_jax, needs_torch

from .grads import rel_err
from .helpers import spec_and_weights
from .test_grpo_recurrent import rollout_batch

CORE = "transformer.core_block.0.mlp.fc.weight"


def on_policy(seed: int) -> dict[str, np.ndarray]:
    mb = rollout_batch(seed)
    mb.pop("old_logprobs")
    mb.pop("ref_logprobs")
    return mb


# -- the weights --------------------------------------------------------------------------------
def test_iteration_weights_follow_rltt_options_a_and_b():
    np.testing.assert_allclose(iteration_weights(4, "uniform"), [0.25] * 4)
    np.testing.assert_allclose(iteration_weights(3, "increasing"), np.array([1, 2, 3]) / 6, rtol=1e-6)
    np.testing.assert_allclose(iteration_weights(3, "increasing", 2.0), np.array([1, 4, 9]) / 14, rtol=1e-6)
    np.testing.assert_array_equal(iteration_weights(3, "final"), [0, 0, 1])
    np.testing.assert_allclose(iteration_weights(3, "increasing", 0.0), iteration_weights(3, "uniform"))


def test_bad_configs_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="weighting must be one of"):
        TrajectoryLossConfig(weighting="last")
    with pytest.raises(ConfigError, match="alpha"):
        TrajectoryCredit("increasing", alpha=-1.0)
    with pytest.raises(ConfigError, match="successive_kl"):
        TrajectoryCredit(successive_kl=float("nan"))
    with pytest.raises(ConfigError, match="entropy_coef"):
        TrajectoryLossConfig(policy=PolicyLossConfig(entropy_coef=0.01), weighting="uniform")
    with pytest.raises(TrainerError, match="num_iterations=1"):
        GRPOConfig(num_iterations=2, trajectory=TrajectoryCredit("uniform"))
    GRPOConfig(num_iterations=2, trajectory=TrajectoryCredit("final"))  # plain GRPO: off-policy passes are fine
    cfg = GRPOConfig(trajectory=TrajectoryCredit("increasing", alpha=2.0, successive_kl=0.1))
    name, loss_cfg = cfg.train_loss(cfg.loss_config())
    assert name == "trajectory" and loss_cfg.policy == cfg.loss_config() and loss_cfg.alpha == 2.0
    assert GRPOConfig().train_loss(GRPOConfig().loss_config())[0] == "policy"


# -- the objective against a numpy oracle ---------------------------------------------------------
def _k3(lp, ref):
    d = ref - lp
    return np.expm1(d) - d


def oracle(lps, det, adv, mask, ref, w, cfg: TrajectoryLossConfig) -> float:
    """RLTT's weighted log-prob through the clipped surrogate, written from the formulas in float64."""
    p = cfg.policy
    agg, old = np.einsum("bkt,k->bt", lps, w), np.einsum("bkt,k->bt", det, w)
    r = np.exp(agg - old)
    a = adv[:, None]
    per = np.maximum(-a * r, -a * np.clip(r, 1 - p.eps_low, 1 + p.eps_high)) + p.beta * _k3(agg, ref)
    if cfg.successive_kl:
        per = per + cfg.successive_kl * _k3(lps[:, 1:], lps[:, :-1]).mean(axis=1)
    if p.aggregation == "token_mean":
        return float((per * mask).sum() / mask.sum())
    assert p.aggregation == "seq_mean_token_mean"
    return float(((per * mask).sum(-1) / mask.sum(-1)).mean())


def _random_inputs(seed: int, b: int = 3, k: int = 3, t: int = 5):
    rng = np.random.default_rng(seed)
    lps = np.log(rng.uniform(0.05, 0.9, (b, k, t)))
    det = lps + 0.3 * rng.standard_normal((b, k, t))  # ratios far from 1: the clip is active somewhere
    mask = (rng.uniform(size=(b, t)) > 0.3).astype(np.float64)
    mask[:, 0] = 1.0
    return lps, det, rng.standard_normal(b), mask, np.log(rng.uniform(0.05, 0.9, (b, t)))


def _loss_and_grad(lib: str, lps, det, adv, mask, ref, cfg):
    fn = get_loss("trajectory")

    def batch(x, asarray):
        return {"iteration_logprobs": x, "detached_iteration_logprobs": asarray(det), "advantages": asarray(adv),
                "mask": asarray(mask), "ref_logprobs": asarray(ref)}

    if lib == "numpy":
        total, den, _ = fn(batch(lps, np.asarray), cfg)
        return float(total / den), None
    if lib == "torch":
        import torch

        x = torch.tensor(lps, dtype=torch.float64, requires_grad=True)
        total, den, _ = fn(batch(x, lambda a: torch.tensor(a, dtype=torch.float64)), cfg)
        loss = total / den
        loss.backward()
        return float(loss.detach()), x.grad.numpy()
    import jax
    import jax.numpy as jnp

    def f(x):
        total, den, _ = fn(batch(x, lambda a: jnp.asarray(a, jnp.float32)), cfg)
        return total / den

    val, g = jax.value_and_grad(f)(jnp.asarray(lps, jnp.float32))
    return float(val), np.asarray(g, np.float64)


@pytest.mark.parametrize("lib", ["numpy", pytest.param("torch", marks=needs_torch),
                                 pytest.param("jax", marks=needs_jax)])
@pytest.mark.parametrize("weighting,alpha,skl,agg", [("uniform", 1.0, 0.0, "token_mean"),
                                                      ("increasing", 2.0, 0.5, "seq_mean_token_mean")])
def test_objective_and_gradient_match_a_numpy_oracle(lib, weighting, alpha, skl, agg):
    """Value on every namespace; gradient w.r.t. the per-iteration log-probs against central differences."""
    cfg = TrajectoryLossConfig(policy=PolicyLossConfig(beta=0.1, aggregation=agg), weighting=weighting,
                               alpha=alpha, successive_kl=skl)
    lps, det, adv, mask, ref = _random_inputs(3)
    w = iteration_weights(lps.shape[1], weighting, alpha).astype(np.float64)
    want = oracle(lps, det, adv, mask, ref, w, cfg)
    got, grad = _loss_and_grad(lib, lps, det, adv, mask, ref, cfg)
    tol = 1e-10 if lib != "jax" else 1e-5  # jax runs float32
    assert abs(got - want) <= tol * max(1.0, abs(want)), (got, want)
    if grad is None:
        return
    eps, fd = 1e-6, np.zeros_like(lps)
    for idx in np.ndindex(lps.shape):
        hi, lo = lps.copy(), lps.copy()
        hi[idx] += eps
        lo[idx] -= eps
        fd[idx] = (oracle(hi, det, adv, mask, ref, w, cfg) - oracle(lo, det, adv, mask, ref, w, cfg)) / (2 * eps)
    assert np.abs(fd).max() > 1e-3
    assert rel_err(grad, fd) <= (1e-6 if lib == "torch" else 1e-4), rel_err(grad, fd)


def test_per_iteration_weighting_refuses_old_logprobs():
    lps, det, adv, mask, ref = _random_inputs(0)
    batch = {"iteration_logprobs": lps, "detached_iteration_logprobs": det, "advantages": adv, "mask": mask,
             "old_logprobs": ref}
    with pytest.raises(LossInputError, match="on-policy"):
        get_loss("trajectory")(batch, TrajectoryLossConfig(weighting="uniform"))


# -- on the recurrent models ------------------------------------------------------------------------
SLOW_JAX = pytest.param("jax", marks=[needs_jax, pytest.mark.slow])  # JAX train-step compiles: minutes on a loaded CPU
FAST_TORCH = pytest.param("torch", marks=needs_torch)


@pytest.mark.parametrize("name", [SLOW_JAX, FAST_TORCH])
def test_final_weighting_is_todays_recurrent_grpo_exactly(name):
    """``final`` runs the policy loss on the same log-probs: loss and gradient bit for bit, with and without
    old_logprobs (the detached default)."""
    b = get_backend(name)
    spec, w = spec_and_weights(1)
    state = b.init_train_state(b.build(spec, w), OptimConfig(lr=1e-3))
    b.set_depth(state.model, 3, 2)
    cfg = PolicyLossConfig(beta=0.04, aggregation="seq_mean_token_mean")
    for mb in (rollout_batch(0), {k: v for k, v in rollout_batch(1).items() if k != "old_logprobs"}):
        g_pol, l_pol = b.gradients(state, [mb], "policy", cfg)
        g_tra, l_tra = b.gradients(state, [mb], "trajectory", TrajectoryLossConfig(policy=cfg, weighting="final"))
        assert l_pol == l_tra
        assert np.linalg.norm(g_pol[CORE]) > 0
        for n in g_pol:
            np.testing.assert_array_equal(g_pol[n], g_tra[n], err_msg=n)


@pytest.mark.parametrize("name", BACKENDS)
def test_iteration_logprobs_are_each_iterations_readout(name):
    """Row i of ``iteration_logprobs`` at (r, k) = (4, 2) is the plain log-prob at depth r - k + 1 + i."""
    b = get_backend(name)
    R = b._impl(spec_and_weights(0)[0])
    spec, w = spec_and_weights(2)
    model = b.build(spec, w)
    mb = rollout_batch(4)
    tok, am = mb["tokens"], mb["attention_mask"]
    got = np.asarray(b.to_numpy(R.iteration_logprobs(model, tok[:, :-1], am[:, :-1], tok[:, 1:], num_steps=4,
                                                     num_grad_steps=2)))
    assert got.shape == (4, 2, 7)
    for i, r in enumerate((3, 4)):
        want = np.asarray(b.to_numpy(R.logprobs(model, tok[:, :-1], am[:, :-1], tok[:, 1:], num_steps=r)))
        np.testing.assert_allclose(got[:, i], want, atol=2e-5, rtol=1e-5)
    assert np.abs(got[:, 0] - got[:, 1]).max() > 1e-3  # the iterations differ, so the check can fail


@pytest.mark.parametrize("name,weighting", [
    pytest.param("torch", "uniform", marks=needs_torch),
    pytest.param("torch", "increasing", marks=[needs_torch, pytest.mark.slow]),
    pytest.param("jax", "uniform", marks=[needs_jax, pytest.mark.slow]),
    pytest.param("jax", "increasing", marks=[needs_jax, pytest.mark.slow]),
])
def test_weighted_gradient_is_the_weighted_sum_of_truncated_per_depth_gradients(name, weighting):
    """On-policy (ratio 1) the RLTT gradient is ``sum_i w_i`` times the plain GRPO gradient at depth r - k + i with
    i differentiated iterations: the recurrent model's own truncated backprop is the oracle."""
    b = get_backend(name)
    spec, w = spec_and_weights(1)
    state = b.init_train_state(b.build(spec, w), OptimConfig(lr=1e-3))
    pol = PolicyLossConfig(beta=0.0, aggregation="token_mean")
    mb = on_policy(0)
    r, k = 4, 3
    b.set_depth(state.model, r, k)
    got, _ = b.gradients(state, [mb], "trajectory", TrajectoryLossConfig(policy=pol, weighting=weighting))
    want = {n: np.zeros_like(v) for n, v in got.items()}
    for i, wi in enumerate(iteration_weights(k, weighting), start=1):
        b.set_depth(state.model, r - k + i, i)
        g, _ = b.gradients(state, [mb], "policy", pol)
        for n in want:
            want[n] += wi * g[n]
    b.set_depth(state.model, r, 1)
    final, _ = b.gradients(state, [mb], "policy", pol)
    assert rel_err(final[CORE], want[CORE]) > 1e-2  # differs from plain GRPO, so the comparison can fail
    for n in want:
        assert rel_err(got[n], want[n]) <= 1e-4, (n, rel_err(got[n], want[n]))


def test_a_model_without_iterations_refuses_per_iteration_credit(backend):
    spec = tiny_spec("llama")
    state = backend.init_train_state(backend.build(spec, spec.init_weights(0)), OptimConfig(lr=1e-3))
    with pytest.raises(StepError, match="recurrent-depth model"):
        backend.gradients(state, [on_policy(0)], "trajectory", TrajectoryLossConfig(weighting="uniform"))


@needs_jax
@needs_torch
@pytest.mark.slow
def test_jax_and_torch_agree_on_trajectory_grpo_steps():
    """Two optimizer steps of increasing-weight credit with the successive KL and a reference KL, at (3, 2) then
    (5, 2): losses and updated weights within the fp32 tolerances of DESIGN.md."""
    spec, w = spec_and_weights(2)
    cfg = TrajectoryLossConfig(policy=PolicyLossConfig(beta=0.04, aggregation="seq_mean_token_mean"),
                               weighting="increasing", successive_kl=0.1)
    out = {}
    for name in ("jax", "torch"):
        b = get_backend(name)
        state = b.init_train_state(b.build(spec, w), OptimConfig(lr=1e-2))
        losses = []
        for step, (r, k) in enumerate([(3, 2), (5, 2)]):
            b.set_depth(state.model, r, k)
            mb = rollout_batch(10 + step)
            mb.pop("old_logprobs")
            state, m = b.train_step(state, [mb], "trajectory", cfg)
            assert m["skipped"] == 0.0 and m["successive_kl"] > 0
            losses.append(m["loss"])
        out[name] = (losses, b.export_weights(state))
    (lj, wj), (lt, wt) = out["jax"], out["torch"]
    for a, c in zip(lj, lt):
        assert abs(a - c) <= 1e-4 * max(abs(c), 1e-6), (lj, lt)
    for n in wt:
        assert rel_err(wj[n], wt[n]) <= 1e-4, (n, rel_err(wj[n], wt[n]))
    assert max(rel_err(wt[n], w[n]) for n in w) > 1e-3
