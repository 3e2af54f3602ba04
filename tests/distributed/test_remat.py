"""Activation checkpointing (``remat: none | layer``): the same gradients, with each decoder layer recomputed.

Oracles: the gradients without remat (equal to 1e-6), and the recomputation itself: torch runs each layer's
forward twice per step under ``layer`` (once more in the backward), JAX's program contains the
``jax.checkpoint`` (remat) primitive. The recurrent core block is rematerialised per iteration under truncated
backprop on both backends already (``tests/recurrent``).
"""

from __future__ import annotations

import pytest

from tests.distributed import cases
from tests.train import batches as B
from tests.train.helpers import needs_jax, needs_torch


def _grads(backend: str, remat: str):
    import importlib

    model_lib = importlib.import_module(f"diptych.backends.{backend}.model")
    T = importlib.import_module(f"diptych.backends.{backend}.train")
    from diptych.core.losses import SFTLossConfig

    spec = cases.spec()
    model = model_lib.build(spec, spec.init_weights(0), **({"device": "cpu"} if backend == "torch" else {}))
    model_lib.set_remat(model, remat)
    state = T.init_train_state(model, cases.optim())
    return state, T.gradients(state, [B.sft_batch(b=4)], "sft", SFTLossConfig())


@pytest.mark.parametrize("backend", [pytest.param("jax", marks=needs_jax), pytest.param("torch", marks=needs_torch)])
def test_layer_remat_gives_the_same_gradients(backend):
    _, (plain, loss) = _grads(backend, "none")
    _, (remat, loss_r) = _grads(backend, "layer")
    assert loss_r == pytest.approx(loss, rel=1e-6)
    assert cases.rel_err(remat, plain) <= 1e-6


@needs_torch
def test_torch_layer_remat_recomputes_each_layer_in_the_backward():
    from diptych.backends.torch import model as model_lib
    from diptych.backends.torch import train as T
    from diptych.core.losses import SFTLossConfig

    calls = {}
    for remat in ("none", "layer"):
        spec = cases.spec()
        model = model_lib.build(spec, spec.init_weights(0), device="cpu")
        model_lib.set_remat(model, remat)
        n, layer = [0], model.model.layers[0]

        def counted(*a, forward=layer.forward, n=n, **k):
            n[0] += 1
            return forward(*a, **k)

        layer.forward = counted
        state = T.init_train_state(model, cases.optim())
        T.train_step(state, [B.sft_batch(b=4)], "sft", SFTLossConfig())
        calls[remat] = n[0]
    assert calls == {"none": 1, "layer": 2}


@needs_jax
def test_jax_layer_remat_puts_checkpoint_in_the_differentiated_program():
    import jax
    import numpy as np

    from diptych.backends.jax import model as model_lib

    spec = cases.spec()
    batch = B.sft_batch(b=2)
    programs = {}
    for remat in ("none", "layer"):
        model = model_lib.build(spec, spec.init_weights(0))
        model_lib.set_remat(model, remat)
        from flax import nnx

        graphdef, state = nnx.split(model)

        def loss(state, graphdef=graphdef):
            m = nnx.merge(graphdef, state)
            return model_lib.hidden_states(m, np.asarray(batch["tokens"]), np.asarray(batch["attention_mask"])).sum()

        programs[remat] = str(jax.make_jaxpr(jax.grad(loss))(state))
    assert "remat" not in programs["none"]  # jax.checkpoint is the remat2 primitive
    assert "remat" in programs["layer"]
    with pytest.raises(ValueError, match="remat must be one of"):
        model_lib.set_remat(model, "everything")
