"""Bad layouts fail at the backend's entry points with the core's one-line message, before any compute."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core.mesh import MeshConfig, MeshError
from tests.distributed import cases
from tests.train import batches as B
from tests.train.helpers import needs_jax, needs_torch


@needs_jax
def test_jax_mesh_larger_than_the_devices_is_refused():
    import jax

    from diptych.backends.jax import sharding as S

    with pytest.raises(MeshError, match=f"4 devices but the run has {len(jax.devices())} devices"):
        S.make_mesh(MeshConfig(fsdp=4))


@needs_jax
def test_jax_one_device_mesh_places_state_and_batch():
    from diptych.backends.jax import sharding as S

    mesh = S.make_mesh(MeshConfig(), None)
    batch = S.shard_batch(B.sft_batch(b=3), mesh)
    assert batch["tokens"].shape == (3, 12)


@needs_torch
def test_torch_mesh_larger_than_the_job_is_refused():
    from diptych.backends.torch import distributed as D
    from diptych.backends.torch import model as model_lib

    spec = cases.spec()
    model = model_lib.build(spec, spec.init_weights(0), device="cpu")
    with pytest.raises(MeshError, match="2 devices but the run has 1 processes"):
        D.shard_model(model, MeshConfig(fsdp=2))


@needs_torch
def test_torch_recurrent_tensor_parallel_is_refused_before_sharding():
    from diptych.backends.torch import distributed as D
    from diptych.backends.torch import recurrent

    spec = cases.spec("recurrent")
    model = recurrent.build(spec, spec.init_weights(0))
    with pytest.raises(MeshError, match="no tensor-parallel plan for recurrent"):
        D.shard_model(model, MeshConfig(tensor=2))


@needs_torch
def test_torch_sharded_step_refuses_an_indivisible_batch_before_the_forward(monkeypatch):
    from diptych.backends.torch import distributed as D
    from diptych.backends.torch import model as model_lib
    from diptych.backends.torch import train as T
    from diptych.core.losses import SFTLossConfig

    spec = cases.spec()
    model = model_lib.build(spec, spec.init_weights(0), device="cpu")
    model.diptych_mesh = (MeshConfig(data=2, fsdp=2), None)  # what shard_model records, without a job
    model.diptych_ops = D
    state = T.init_train_state(model, cases.optim())
    ran = []
    monkeypatch.setattr(D, "call", lambda *a, **k: ran.append(1))
    with pytest.raises(MeshError, match=r"6 rows, not divisible by data x fsdp = 4"):
        D.train_step(state, [B.sft_batch(b=6)], "sft", SFTLossConfig())
    assert not ran
    assert np.array_equal(T.export_weights(state)["model.norm.weight"], spec.init_weights(0)["model.norm.weight"])
