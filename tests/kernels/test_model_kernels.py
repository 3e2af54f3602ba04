"""A model forward + log-prob + backward through every kernel path equals the naive reference path.

Two levels: the decoder's seam (``hidden_states`` + ``lm_head_weight``) fed to the backend's
``selective_logprobs`` with a small chunk size, and the wired-in entry points themselves
(``model.logprobs`` with the mode given to ``build``, and the train step's
``logprobs_and_entropy``). Gradients are taken with respect to every parameter (the tied
embedding gets both its input and output gradient), on a left-padded batch whose pad positions
are masked out of the objective.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from diptych.core.spec import tiny_spec
from tests.conftest import needs_jax, needs_torch, needs_triton

SPEC = tiny_spec("qwen3", head_dim=16, tie_word_embeddings=True)
MASK = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=np.int32)


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, SPEC.vocab_size, size=MASK.shape).astype(np.int32)
    targets = np.roll(tokens, -1, axis=1)
    coeff = rng.normal(size=MASK.shape).astype(np.float32) * MASK
    return tokens, targets, coeff


@functools.cache
def _jax_run(kernels: str, temperature: float = 0.8):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from diptych.backends.jax import model as jm
    from diptych.backends.jax.kernels import selective_logprobs

    tokens, targets, coeff = _batch()
    model = jm.build(SPEC, SPEC.init_weights(0))
    graphdef, state = nnx.split(model)

    def objective(state):
        m = nnx.merge(graphdef, state)
        hidden = jm.hidden_states(m, tokens, MASK)
        lp, ent = selective_logprobs(hidden, jm.lm_head_weight(m), jnp.asarray(targets), temperature, kernels=kernels,
                                     chunk_size=5)
        return jnp.sum(lp * coeff) + 0.1 * jnp.sum(ent * coeff), lp

    (_, lp), grads = jax.value_and_grad(objective, has_aux=True)(state)
    flat = {".".join(map(str, path)): np.asarray(v[...]) for path, v in nnx.to_flat_state(grads)}
    return np.asarray(lp), flat, np.asarray(jm.logprobs(model, tokens, MASK, targets, temperature))


@functools.cache
def _torch_run(kernels: str, temperature: float = 0.8):
    import torch

    from diptych.backends.torch import model as tm
    from diptych.backends.torch.kernels import selective_logprobs

    tokens, targets, coeff = _batch()
    model = tm.build(SPEC, SPEC.init_weights(0))
    hidden = tm.hidden_states(model, tokens, MASK)
    lp, ent = selective_logprobs(hidden, tm.lm_head_weight(model), torch.tensor(targets).long(), temperature,
                                 kernels=kernels, chunk_size=5)
    c = torch.tensor(coeff)
    ((lp * c).sum() + 0.1 * (ent * c).sum()).backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    with torch.no_grad():
        theirs = tm.logprobs(model, tokens, MASK, targets, temperature)
    return lp.detach().numpy(), grads, theirs.numpy()


def _assert_same(run, kernels):
    lp, grads, model_lp = run(kernels)
    ref_lp, ref_grads, _ = run("reference")
    valid = MASK.astype(bool)
    np.testing.assert_allclose(lp[valid], ref_lp[valid], atol=1e-5)
    # The model's own log-prob path is an independent oracle for the forward.
    np.testing.assert_allclose(lp[valid], model_lp[valid], atol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 5
    for name in grads:
        g, r = grads[name], ref_grads[name]
        rel = np.abs(g - r).max() / max(np.abs(r).max(), 1e-12)
        assert rel <= 1e-4, f"{name}: gradient rel err {rel:.3g}"


@needs_jax
@pytest.mark.parametrize("kernels", ["chunked", pytest.param("fused", marks=pytest.mark.slow)])
def test_jax_model_logprob_backward_equals_reference(kernels):
    _assert_same(_jax_run, kernels)


@needs_torch
@pytest.mark.parametrize("kernels", ["chunked", pytest.param("fused", marks=needs_triton)])
def test_torch_model_logprob_backward_equals_reference(kernels):
    _assert_same(_torch_run, kernels)


# -- the wired-in entry points: build(kernels=...) -> logprobs, and the train step's entropy path ----


@functools.cache
def _jax_model_run(kernels: str, temperature: float = 0.8):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from diptych.backends.jax import model as jm
    from diptych.backends.jax import train as jt

    tokens, targets, coeff = _batch()
    model = jm.build(SPEC, SPEC.init_weights(0), kernels=kernels)
    graphdef, state = nnx.split(model)

    def objective(state):
        m = nnx.merge(graphdef, state)
        lp = jm.logprobs(m, tokens, MASK, targets, temperature)
        hidden = jm.hidden_states(m, tokens, MASK)
        _, ent = jt.logprobs_and_entropy(hidden, jm.lm_head_weight(m), jnp.asarray(targets), temperature,
                                         kernels=m.kernels)
        return jnp.sum(lp * coeff) + 0.1 * jnp.sum(ent * coeff), (lp, ent)

    (_, (lp, ent)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(state)
    flat = {".".join(map(str, path)): np.asarray(v[...]) for path, v in nnx.to_flat_state(grads)}
    return np.asarray(lp), np.asarray(ent), flat


@functools.cache
def _torch_model_run(kernels: str, temperature: float = 0.8):
    import torch

    from diptych.backends.torch import model as tm
    from diptych.backends.torch import train as tt

    tokens, targets, coeff = _batch()
    model = tm.build(SPEC, SPEC.init_weights(0), kernels=kernels, device="cpu")
    lp = tm.logprobs(model, tokens, MASK, targets, temperature)
    hidden = tm.hidden_states(model, tokens, MASK)
    _, ent = tt.logprobs_and_entropy(hidden, tm.lm_head_weight(model), torch.tensor(targets).long(), temperature,
                                     kernels=model.kernels)
    c = torch.tensor(coeff)
    ((lp * c).sum() + 0.1 * (ent * c).sum()).backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    return lp.detach().numpy(), ent.detach().numpy(), grads


def _assert_model_same(run, kernels):
    lp, ent, grads = run(kernels)
    ref_lp, ref_ent, ref_grads = run("reference")
    valid = MASK.astype(bool)
    np.testing.assert_allclose(lp[valid], ref_lp[valid], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ent[valid], ref_ent[valid], atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(SPEC.param_shapes())
    for name in grads:
        g, r = grads[name], ref_grads[name]
        assert np.abs(r).max() > 0, name
        rel = np.abs(g - r).max() / np.abs(r).max()
        assert rel <= 1e-4, f"{name}: gradient rel err {rel:.3g}"


@needs_jax
@pytest.mark.parametrize("kernels", ["chunked", "auto", pytest.param("fused", marks=pytest.mark.slow)])
def test_jax_built_model_logprobs_entropy_and_grads_equal_reference(kernels):
    _assert_model_same(_jax_model_run, kernels)


@needs_torch
@pytest.mark.parametrize("kernels", ["chunked", "auto", pytest.param("fused", marks=needs_triton)])
def test_torch_built_model_logprobs_entropy_and_grads_equal_reference(kernels):
    _assert_model_same(_torch_model_run, kernels)


@needs_torch
def test_torch_fused_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    """Asking for Triton where it cannot run fails at build (or at the call that overrides), naming the fix."""
    from diptych.backends.torch import model as tm

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read at each resolve: triton's own import state is untouched
    with pytest.raises(RuntimeError, match="use kernels='chunked'"):
        tm.build(SPEC, SPEC.init_weights(0), kernels="fused", device="cpu")
    model = tm.build(SPEC, SPEC.init_weights(0), device="cpu")
    tokens, targets, _ = _batch()
    with pytest.raises(RuntimeError, match="use kernels='chunked'"):
        tm.logprobs(model, tokens, MASK, targets, kernels="fused")
    assert not any(m.fused for m in model.modules() if isinstance(m, tm.RMSNorm))  # auto on CPU = chunked


@needs_torch
def test_torch_fused_without_triton_is_a_clear_error(monkeypatch):
    from diptych.backends.torch import kernels as tk
    from diptych.backends.torch import model as tm

    monkeypatch.setattr(tk, "_triton_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"needs triton.*kernels='chunked'"):
        tm.build(SPEC, SPEC.init_weights(0), kernels="fused", device="cpu")
