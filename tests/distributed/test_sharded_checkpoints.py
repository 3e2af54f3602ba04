"""Sharded checkpoints: saved on one mesh, restored on another, training continues as if it never stopped.

torch: ``torch.distributed.checkpoint`` (each rank writes its own shards), saved at fsdp=4 after 2 of 5 steps and
resumed at fsdp=2 (2 processes) and on one plain process; the HF folder exported from the sharded state holds
the weights of the uninterrupted run at the save step. A save that fails leaves the last good checkpoint.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.distributed import cases
from tests.distributed.conftest import HERE, load, run_worker, torchrun, weights
from tests.train.helpers import needs_jax, needs_torch

SAVED_AT = 2


@pytest.fixture(scope="module")
def torch_saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch_ckpt")
    run_worker(torchrun(4, str(HERE / "torch_ckpt_worker.py"), "save", str(root / "step"), "fsdp=4", str(SAVED_AT)),
               timeout=600)
    return root


@needs_torch
@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["fsdp=2", "one"])
def test_torch_checkpoint_saved_at_fsdp4_resumes_elsewhere_like_the_uninterrupted_run(torch_saved, mesh, tmp_path):
    out = tmp_path / "resumed.npz"
    args = [str(HERE / "torch_ckpt_worker.py"), "resume", str(torch_saved / "step"), mesh, str(out)]
    run_worker(torchrun(2, *args) if mesh != "one" else [sys.executable, *args], timeout=600)
    r = load(out)
    assert int(r["step"][0]) == cases.STEPS
    assert np.max(np.abs(r["loss"] - r["ref_loss"]) / np.abs(r["ref_loss"])) <= cases.TOL
    got = {k[2:]: v for k, v in r.items() if k.startswith("w/")}
    assert cases.rel_err(got, weights({f"x/w/{k[4:]}": v for k, v in r.items() if k.startswith("ref/")}, "x"))\
        <= cases.TOL


@needs_torch
@pytest.mark.slow
def test_torch_hf_export_from_a_sharded_state_holds_the_full_weights(torch_saved, tmp_path):
    from diptych.core.hf import load_hf_folder

    out = tmp_path / "resumed.npz"
    run_worker([sys.executable, str(HERE / "torch_ckpt_worker.py"), "resume", str(torch_saved / "step"), "one",
                str(out)], timeout=600)
    at_save = {k[len("at_save/"):]: v for k, v in load(out).items() if k.startswith("at_save/")}
    spec, hf = load_hf_folder(torch_saved / "hf")
    assert spec == cases.spec()
    assert set(hf) == set(at_save)
    assert cases.rel_err(hf, at_save) <= cases.TOL


@needs_torch
def test_torch_failed_sharded_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from diptych.backends.torch import distributed as D
    from diptych.backends.torch import model as model_lib
    from diptych.backends.torch import train as T
    from diptych.core.mesh import MeshConfig

    spec = cases.spec()
    st = T.init_train_state(D.shard_model(model_lib.build(spec, spec.init_weights(0), device="cpu"), MeshConfig()),
                            cases.optim())
    path = tmp_path / "step_00000001"
    D.save(st, path, metadata={"good": True})
    before = sorted(p.name for p in (path / D.DCP_DIR).iterdir())

    def killed(*a, **k):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(dcp, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        D.save(st, path, metadata={"good": False})
    assert sorted(p.name for p in (path / D.DCP_DIR).iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary folder left behind
    restored, meta = D.restore(path)
    assert meta == {"good": True}
    assert cases.rel_err(T.export_weights(restored), spec.init_weights(0)) == 0.0


@pytest.fixture(scope="module")
def jax_resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("jax_ckpt")
    run_worker([sys.executable, str(HERE / "jax_ckpt_worker.py"), str(root), str(root / "out.npz")], timeout=900)
    return load(root / "out.npz")


@needs_jax
@pytest.mark.slow
@pytest.mark.parametrize(("mesh", "devices"), [("fsdp=2", 2), ("one", 1)])
def test_jax_checkpoint_saved_at_fsdp4_resumes_elsewhere_like_the_uninterrupted_run(jax_resumed, mesh, devices):
    r = jax_resumed
    assert int(r[f"{mesh}/devices"][0]) == devices  # restored straight into the new layout
    assert len(r[f"{mesh}/bytes"]) == devices
    assert int(r[f"{mesh}/step"][0]) == cases.STEPS
    assert np.max(np.abs(r[f"{mesh}/loss"] - r["ref/loss"]) / np.abs(r["ref/loss"])) <= cases.TOL
    assert cases.rel_err(weights(r, mesh), weights(r, "ref")) <= cases.TOL


@needs_torch
@pytest.mark.slow
def test_torch_sharded_ppo_checkpoint_keeps_the_value_head_and_its_adam_state(tmp_path):
    out = tmp_path / "ppo.npz"
    run_worker(torchrun(2, str(HERE / "torch_ppo_ckpt_worker.py"), str(tmp_path / "step"), str(out)), timeout=600)
    r = load(out)
    assert r["step"].tolist() == [2, 3] and bool(r["meta_value_head"][0])
    straight, resumed = weights(r, "straight"), weights(r, "resumed")
    assert "value_head.weight" in straight and set(straight) == set(resumed)
    assert cases.rel_err(resumed, straight) <= cases.TOL
    head = {k: v for k, v in resumed.items() if k.startswith("value_head")}
    assert cases.rel_err(head, {k: straight[k] for k in head}) <= cases.TOL  # moments restored, not reset


@needs_torch
@pytest.mark.slow
def test_torch_sharded_bf16_checkpoint_restores_its_float32_masters_on_any_layout(tmp_path):
    folder, out, one = tmp_path / "step", tmp_path / "sharded.npz", tmp_path / "one.npz"
    run_worker(torchrun(2, str(HERE / "torch_bf16_ckpt_worker.py"), "save", str(folder), str(out)), timeout=600)
    run_worker([sys.executable, str(HERE / "torch_bf16_ckpt_worker.py"), "one", str(folder), str(one)], timeout=600)
    r, o = load(out), load(one)
    saved = weights(r, "saved")
    assert cases.rel_err(weights(r, "restored"), saved) == 0.0  # float32 masters, not their bf16 copies
    assert cases.rel_err({k[2:]: v for k, v in o.items() if k.startswith("w/")}, saved) == 0.0
    assert r["mp"][0] == o["mp"][0] == "bf16" and o["dtype"][0] == "torch.bfloat16"  # one process: bf16 model
    assert abs(float(r["loss"][0]) - float(o["loss"][0])) <= 2e-2 * abs(float(o["loss"][0]))
