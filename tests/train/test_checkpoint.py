"""Checkpoints: kill-and-resume continues the exact run; atomic writes; keep-last-K; RNG state."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core import checkpointing as ckpt

from . import batches
from .helpers import BACKENDS, mods, state


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _run(train, st, steps, rng):
    """A tiny 'trainer': the data comes from an RNG stream, so resuming must restore it too."""
    from diptych.core.losses import PolicyLossConfig

    losses = []
    for _ in range(steps):
        st, m = train.train_step(st, [batches.grpo_batch(seed=int(rng.integers(1 << 30)), b=4)], "policy",
                                 PolicyLossConfig(beta=0.04))
        losses.append(m["loss"])
    return st, losses


def test_resume_matches_uninterrupted_run(backend, tmp_path):
    from diptych.core.optim import OptimConfig

    _, train, checkpoint = mods(backend)
    optim = OptimConfig(lr=3e-3, warmup_steps=1, total_steps=6, schedule="cosine")
    spec = batches.spec()

    rng = np.random.default_rng(7)
    st, _ = _run(train, state(backend, spec, optim, value_head=True), 2, rng)
    checkpoint.save(st, ckpt.step_dir(tmp_path, st.step), metadata={"data_position": 2, "rng": ckpt.rng_state(rng)})
    st, uninterrupted = _run(train, st, 3, rng)
    del st  # "kill" the run

    restored, meta = checkpoint.restore(ckpt.latest_checkpoint(tmp_path))
    assert restored.step == 2 and meta["data_position"] == 2
    restored, resumed = _run(train, restored, 3, ckpt.rng_from_state(meta["rng"]))
    assert resumed == uninterrupted  # bit-identical on the same backend
    head = train.export_value_head(restored)
    assert head is not None and head["value_head.weight"].shape == (1, spec.hidden_size)


def test_keep_last_and_failed_write_leave_only_complete_checkpoints(backend, tmp_path):
    from diptych.core.optim import OptimConfig

    checkpoint = mods(backend)[2]
    st = state(backend, batches.spec(), OptimConfig())
    for step in (1, 2, 3):
        checkpoint.save(st, ckpt.step_dir(tmp_path, step), metadata={}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    with pytest.raises(TypeError):
        checkpoint.save(st, ckpt.step_dir(tmp_path, 4), metadata={"bad": object()})
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]


def test_restore_rejects_other_backend_and_non_checkpoints(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="not a diptych checkpoint"):
        ckpt.read_metadata(tmp_path / "x")


def test_rng_state_roundtrips_through_json():
    import json

    rng = np.random.default_rng(3)
    rng.integers(10, size=5)
    saved = json.loads(json.dumps(ckpt.rng_state(rng)))
    assert ckpt.rng_from_state(saved).integers(1 << 40, size=4).tolist() == rng.integers(1 << 40, size=4).tolist()
