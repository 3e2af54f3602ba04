"""A policy micro-batch may omit ``old_logprobs`` (one GRPO iteration): the step feeds the detached current
log-probs, which must give the same loss and gradient as passing the model's own log-probs explicitly."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core.losses import PolicyLossConfig

from . import batches
from .helpers import BACKENDS, mods, rel_err, state


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _own_logprobs(backend: str, st, batch) -> np.ndarray:
    model_mod = mods(backend)[0]
    tok, am = batch["tokens"], batch["attention_mask"]
    lp = model_mod.logprobs(st.model, tok[:, :-1], am[:, :-1], tok[:, 1:])
    return np.asarray(lp.detach().numpy() if hasattr(lp, "detach") else lp, dtype=np.float32)


def test_omitted_old_logprobs_equal_explicit_own_logprobs(backend):
    from diptych.core.optim import OptimConfig

    st, train = state(backend, batches.spec(), OptimConfig(lr=1e-3)), mods(backend)[1]
    cfg = PolicyLossConfig(beta=0.04, eps_low=0.2, eps_high=0.28)
    full = batches.grpo_batch(seed=3, b=4)
    own = _own_logprobs(backend, st, full)
    rng = np.random.default_rng(0)
    sampler = (own + 0.01 * rng.standard_normal(own.shape)).astype(np.float32)
    explicit = {**full, "old_logprobs": own, "sampler_logprobs": sampler}
    omitted = {k: v for k, v in explicit.items() if k != "old_logprobs"}

    g_explicit, loss_explicit = train.gradients(st, [explicit], "policy", cfg)
    g_omitted, loss_omitted = train.gradients(st, [omitted], "policy", cfg)
    assert abs(loss_omitted - loss_explicit) <= 1e-5 * max(1.0, abs(loss_explicit))
    assert rel_err(g_omitted, g_explicit) < 1e-4
    # without the stop-gradient the ratio exp(lp - lp) is constant, leaving only the KL gradient:
    g_kl_only, _ = train.gradients(st, [{**explicit, "advantages": np.zeros(4, np.float32)}], "policy", cfg)
    assert rel_err(g_omitted, g_kl_only) > 1e-2

    _, metrics = train.train_step(st, [{k: v[:2] for k, v in omitted.items()},
                                       {k: v[2:] for k, v in omitted.items()}], "policy", cfg)
    want_gap = float(np.max(np.where(full["mask"] > 0, np.abs(own - sampler), 0.0)))
    assert metrics["skipped"] == 0.0
    assert metrics["sampler_logprob_gap"] == pytest.approx(want_gap, rel=1e-3, abs=1e-6)
    assert metrics["ratio"] == pytest.approx(1.0, abs=1e-6)  # old = current policy: the ratio is exactly one
