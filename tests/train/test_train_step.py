"""One train step on each backend: micro-batching, NaN skipping, mixed precision, bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from diptych.core.train_batch import BatchError, split_microbatches

from . import batches
from .helpers import BACKENDS, mods, rel_err, state


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _policy_cfg():
    from diptych.core.losses import PolicyLossConfig

    return PolicyLossConfig(beta=0.04, aggregation="token_mean")


def test_one_vs_four_microbatches_same_update(backend):
    from diptych.core.optim import OptimConfig

    spec = batches.spec()
    optim = OptimConfig(lr=1e-3, max_grad_norm=1.0)
    full = batches.grpo_batch(seed=5, b=8)
    results = []
    for n in (1, 4):
        st, train = state(backend, spec, optim), mods(backend)[1]
        grads, loss = train.gradients(st, split_microbatches(full, n), "policy", _policy_cfg())
        st, m = train.train_step(st, split_microbatches(full, n), "policy", _policy_cfg())
        results.append((grads, loss, m, train.export_weights(st)))
    (g1, l1, m1, w1), (g4, l4, m4, w4) = results
    assert rel_err(g4, g1) <= 1e-5
    assert l4 == pytest.approx(l1, rel=1e-5)
    assert m4["denominator"] == m1["denominator"] == full["mask"].sum()
    assert m4["clipfrac"] == pytest.approx(m1["clipfrac"], abs=1e-6)
    w0 = spec.init_weights(0)
    assert rel_err({k: w4[k] - w0[k] for k in w0}, {k: w1[k] - w0[k] for k in w0}) <= 1e-4
    assert max(float(np.abs(w1[k] - w4[k]).max()) for k in w1) <= 1e-5


def test_nan_loss_skips_step_and_leaves_weights(backend, monkeypatch):
    from diptych.core import losses
    from diptych.core.optim import OptimConfig

    spec = batches.spec()
    st, train = state(backend, spec, OptimConfig(lr=1e-2)), mods(backend)[1]
    mb = [batches.sft_batch(seed=1)]
    st, _ = train.train_step(st, mb, "sft", losses.SFTLossConfig())  # one real step: Adam moments are non-zero
    before_w, before_o = train.export_weights(st), train.export_optimizer(st)
    real = losses.loss_spec("sft")
    nan_loss = lambda b, c: (lambda s, d, m: (s * float("nan"), d, m))(*real.fn(b, c))
    monkeypatch.setitem(losses.LOSS_SPECS, "sft", dataclasses.replace(real, fn=nan_loss))
    if backend == "jax":
        train._micro_fn.cache_clear()
    with pytest.warns(RuntimeWarning, match="Skipping optimizer step"):
        new, metrics = train.train_step(st, mb, "sft", losses.SFTLossConfig())
    if backend == "jax":
        train._micro_fn.cache_clear()
    assert metrics["skipped"] == 1.0 and np.isnan(metrics["loss"])
    assert new.step == 1
    after_w, after_o = train.export_weights(new), train.export_optimizer(new)
    for k in before_w:
        np.testing.assert_array_equal(after_w[k], before_w[k])
        np.testing.assert_array_equal(after_o["mu"][k], before_o["mu"][k])
    assert after_o["count"] == before_o["count"] == 1


def test_bf16_mixed_precision_keeps_float32_master(backend):
    from diptych.core.losses import SFTLossConfig
    from diptych.core.optim import OptimConfig

    spec = batches.spec()
    st, train = state(backend, spec, OptimConfig(lr=1e-5, mixed_precision="bf16")), mods(backend)[1]
    assert st.model.dtype == "bfloat16"
    w0 = train.export_weights(st)
    st, m = train.train_step(st, [batches.sft_batch(seed=2)], "sft", SFTLossConfig())
    w1 = train.export_weights(st)
    assert m["skipped"] == 0.0 and np.isfinite(m["loss"])
    # lr 1e-5 updates are far below bf16 resolution (~4e-3 relative): only fp32 masters can hold them
    delta = max(float(np.abs(w1[k] - w0[k]).max()) for k in w0)
    assert 0 < delta < 1e-4
    assert all(v.dtype == np.float32 for v in w1.values())


def test_lr_metric_follows_schedule(backend):
    from diptych.core.losses import SFTLossConfig
    from diptych.core.optim import OptimConfig, lr_at

    optim = OptimConfig(lr=1e-3, warmup_steps=2, total_steps=4, schedule="linear")
    st, train = state(backend, batches.spec(), optim), mods(backend)[1]
    for step in range(3):
        st, m = train.train_step(st, [batches.sft_batch(seed=step, b=2)], "sft", SFTLossConfig())
        assert m["lr"] == lr_at(step, optim)
    assert st.step == 3


def test_bad_microbatches_raise_clear_errors(backend):
    from diptych.core.losses import SFTLossConfig, ValueLossConfig
    from diptych.core.optim import OptimConfig

    st, train = state(backend, batches.spec(), OptimConfig()), mods(backend)[1]
    good = batches.grpo_batch(b=4)
    with pytest.raises(BatchError, match="lacks advantages"):
        train.train_step(st, [{k: v for k, v in good.items() if k != "advantages"}], "policy", _policy_cfg())
    with pytest.raises(BatchError, match=r"expected \(4, 11\)"):
        train.train_step(st, [{**good, "mask": good["mask"][:, 1:]}], "policy", _policy_cfg())
    with pytest.raises(BatchError, match="Unknown loss 'polcy'"):
        train.train_step(st, [good], "polcy", _policy_cfg())
    with pytest.raises(ValueError, match="value head"):
        train.train_step(st, [batches.ppo_batch(b=4)], "value", ValueLossConfig())
    with pytest.raises(ValueError, match="denominator"):
        train.train_step(st, [{**batches.sft_batch(b=2), "mask": np.zeros((2, 11), np.float32)}], "sft",
                         SFTLossConfig(allow_empty_sequences=True) if hasattr(SFTLossConfig(), "allow_empty_sequences")
                         else SFTLossConfig())


def test_split_microbatches_rejects_uneven_split():
    with pytest.raises(BatchError, match="does not split into 3"):
        split_microbatches(batches.sft_batch(b=8), 3)


def test_first_update_matches_numpy_adamw_with_clipping_and_decay_mask(backend):
    """Oracle: AdamW by hand. Step 1 has m_hat = g and v_hat = g^2, so the update is
    lr * (g_c / (|g_c| + eps) + wd * w) with g_c the clipped gradient, decay on matrices only."""
    from diptych.core.losses import SFTLossConfig
    from diptych.core.optim import OptimConfig

    spec = batches.spec()
    optim = OptimConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=0.3, eps=1e-6)
    st, train = state(backend, spec, optim), mods(backend)[1]
    mbs = [batches.sft_batch(seed=3, b=4)]
    grads, _ = train.gradients(st, mbs, "sft", SFTLossConfig())
    st, m = train.train_step(st, mbs, "sft", SFTLossConfig())
    norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    assert m["grad_norm"] == pytest.approx(norm, rel=1e-5) and norm > optim.max_grad_norm
    w0, w1 = spec.init_weights(0), train.export_weights(st)
    for k, g in grads.items():
        gc = g.astype(np.float64) * (optim.max_grad_norm / norm)
        wd = optim.weight_decay if w0[k].ndim >= 2 else 0.0
        want = w0[k] - optim.lr * (gc / (np.abs(gc) + optim.eps) + wd * w0[k])
        np.testing.assert_allclose(w1[k], want, atol=2e-6, err_msg=k)
