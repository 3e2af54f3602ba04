"""Truncated backprop is real, and JAX and torch agree on logits, losses and gradients."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core.recurrent_spec import initial_state_noise
from tests.conftest import needs_jax, needs_torch
from tests.recurrent.grads import jax_grads, rel_err, torch_grads
from tests.recurrent.helpers import batch, spec_and_weights

GRADS = {"jax": pytest.param(jax_grads, marks=needs_jax, id="jax"),
         "torch": pytest.param(torch_grads, marks=needs_torch, id="torch")}


def _setup():
    spec, w = spec_and_weights(seed=1, n_layers_in_recurrent_block=1, n_embd=32, n_heads=2, intermediate_size=48)
    tokens, mask, targets = batch(seed=2, t=5)
    coef = np.random.default_rng(3).standard_normal(tokens.shape).astype(np.float32)
    s0 = initial_state_noise(spec, (*tokens.shape, spec.n_embd), np.random.default_rng(4))
    return spec, w, tokens, mask, targets, coef, s0


@pytest.mark.parametrize("grads", list(GRADS.values()))
def test_truncated_gradients_equal_explicit_stop_gradient_unroll_and_differ_from_full(grads):
    spec, w, tokens, mask, targets, coef, s0 = _setup()
    r, k = 4, 2
    l_train, g_train = grads(spec, w, tokens, mask, targets, coef, r, k, s0, "train")
    l_oracle, g_oracle = grads(spec, w, tokens, mask, targets, coef, r, k, s0, "oracle")
    l_full, g_full = grads(spec, w, tokens, mask, targets, coef, r, k, s0, "full")
    assert abs(l_train - l_oracle) < 1e-4 and abs(l_train - l_full) < 1e-4  # same forward value
    assert set(g_train) == set(g_oracle) == set(spec.param_shapes())
    for name in g_train:
        assert rel_err(g_train[name], g_oracle[name]) < 1e-4, name
    core = "transformer.core_block.0.attn.Wqkv.weight"
    assert rel_err(g_train[core], g_full[core]) > 1e-3  # truncation changes the gradient when r > k
    assert rel_err(g_train["transformer.prelude.0.mlp.fc.weight"], g_full["transformer.prelude.0.mlp.fc.weight"]) > 1e-3


@pytest.mark.parametrize("grads", list(GRADS.values()))
def test_k_at_least_r_is_the_full_unroll(grads):
    spec, w, tokens, mask, targets, coef, s0 = _setup()
    _, g_train = grads(spec, w, tokens, mask, targets, coef, 3, 8, s0, "train")
    _, g_full = grads(spec, w, tokens, mask, targets, coef, 3, 8, s0, "full")
    for name in g_train:
        assert rel_err(g_train[name], g_full[name]) < 1e-4, name


@needs_jax
@needs_torch
def test_jax_and_torch_agree_on_truncated_logits_loss_and_gradients():
    from diptych.core.backend import get_backend

    spec, w, tokens, mask, targets, coef, s0 = _setup()
    logits = {}
    for name in ("jax", "torch"):
        be = get_backend(name)
        model = be.build(spec, w)
        logits[name] = be.to_numpy(be.forward(model, tokens, mask, num_steps=6, num_grad_steps=2, init_state=s0))
    live = mask.astype(bool)
    np.testing.assert_allclose(logits["jax"][live], logits["torch"][live], atol=1e-5, rtol=0)
    lj, gj = jax_grads(spec, w, tokens, mask, targets, coef, 6, 2, s0, "train")
    lt, gt = torch_grads(spec, w, tokens, mask, targets, coef, 6, 2, s0, "train")
    assert abs(lj - lt) <= 1e-4 * max(1.0, abs(lt))
    for name in gt:
        assert rel_err(gj[name], gt[name]) < 1e-4, name
