"""Checkpoint housekeeping (issue 13 items 5-6): --resume falls back past an unreadable newest checkpoint, saying
which and why; pruning renames before deleting, so a kill midway leaves nothing --resume would take; orphan
temporary folders are removed when a run starts; saves fsync their files and folders."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_torch

from diptych.cli import main
from diptych.core import checkpointing as ckpt

SFT_TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
            "data.task_knobs.digits=1", "data.n_train=16", "data.n_test=4", "sft.batch_size=4",
            "sft.max_prompt_length=6", "sft.max_completion_length=4", "sft.optim.lr=1e-3"]


def _sft(backend, out: Path, *extra: str) -> list[str]:
    return ["train", "sft", "--backend", backend.name, "--quiet", f"out={out}", *SFT_TINY, "checkpoint.every=1",
            "checkpoint.keep_last=3", *extra]


def _truncate_largest(folder: Path) -> Path:
    """Cut the biggest file of a checkpoint in half (a full disk, a copy cut short)."""
    biggest = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = biggest.read_bytes()
    biggest.write_bytes(data[: len(data) // 2])
    return biggest


@pytest.mark.slow  # two runs; ~60 s on JAX
def test_resume_falls_back_past_a_truncated_newest_checkpoint(backend, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_sft(backend, out, "sft.steps=3")) == 0
    root = out / "checkpoints"
    uninterrupted = backend.export_weights(backend.restore(ckpt.step_dir(root, 2))[0])
    _truncate_largest(ckpt.step_dir(root, 3))
    capsys.readouterr()

    assert main(_sft(backend, out, "--resume", "sft.steps=4")) == 0
    err = capsys.readouterr().err
    assert "resume: skipping step_00000003, it cannot be read (" in err and "Traceback" not in err
    assert "resume: from step_00000002" in err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step 3 redone from step 2
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000002", "step_00000003", "step_00000004"]
    assert backend.restore(ckpt.step_dir(root, 3))[0] is not None  # the redone step 3 is intact again
    restored = backend.export_weights(backend.restore(ckpt.step_dir(root, 2))[0])
    assert all(np.array_equal(uninterrupted[k], restored[k]) for k in restored)


def test_resume_with_no_intact_checkpoint_says_so(backend, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_sft(backend, out, "sft.steps=1")) == 0
    _truncate_largest(ckpt.step_dir(out / "checkpoints", 1))
    capsys.readouterr()
    assert main(_sft(backend, out, "--resume", "sft.steps=2")) == 2
    err = capsys.readouterr().err
    assert "skipping step_00000001" in err and "No intact checkpoint" in err and "--overwrite" in err


def test_a_kill_during_pruning_leaves_nothing_resume_would_take(tmp_path, monkeypatch):
    """Pruning renames a checkpoint to a hidden trash name before deleting it: a kill in the middle of the
    delete (simulated: rmtree dies after one file) leaves a trash folder, never a half-deleted ``step_*``."""
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        d = ckpt.step_dir(root, step)
        (d / "state").mkdir(parents=True)
        (d / "state" / "weights.bin").write_bytes(b"x" * 100)
        (d / ckpt.METADATA_FILE).write_text("{}")

    def killed_rmtree(path, *args, **kwargs):
        first = next(p for p in Path(path).rglob("*") if p.is_file())
        first.unlink()
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune(root, keep_last=2)
    monkeypatch.undo()
    names = sorted(p.name for p in root.iterdir())
    assert names == [".step_00000001.trash-" + str(os.getpid()), "step_00000002", "step_00000003"]
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000002", "step_00000003"]
    # the next run (under its lock) removes what the killed one left
    assert [p.name for p in ckpt.clean_orphans(root)] == [".step_00000001.trash-" + str(os.getpid())]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003"]


def test_orphan_temporary_folders_are_removed_when_a_run_starts(backend, tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    orphans = [root / ".step_00000001.tmp-abc123", root / ".step_00000002.trash-99", root / ".reference.tmp-x1"]
    for o in orphans:
        (o / "state").mkdir(parents=True)
        (o / ckpt.METADATA_FILE).write_text("{}")
    assert not ckpt.list_checkpoints(root)
    assert main(_sft(backend, out, "sft.steps=1")) == 0
    assert not any(o.exists() for o in orphans)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000001"]


def test_a_save_fsyncs_its_files_and_the_parent_folder(backend, tmp_path, monkeypatch):
    from diptych.core.optim import OptimConfig
    from diptych.core.spec import tiny_spec

    spec = tiny_spec("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    state = backend.init_train_state(backend.build(spec, spec.init_weights(0)), OptimConfig())
    synced: list[str] = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    path = backend.save(state, ckpt.step_dir(tmp_path, 1), metadata={})
    monkeypatch.undo()
    tmp_names = {Path(s).name for s in synced}
    assert ckpt.METADATA_FILE in tmp_names  # files, fsync'ed before the rename (so under the temporary name)
    assert any(".step_00000001.tmp-" in s for s in synced)  # the folder itself
    assert str(tmp_path) in synced  # the parent, after the rename
    assert path.is_dir() and ckpt.list_checkpoints(tmp_path) == [path]


@needs_torch
def test_a_nan_weight_in_a_native_checkpoint_is_refused_at_resume_naming_the_parameter(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    from diptych.core.backend import get_backend

    torch_backend = get_backend("torch")
    out = tmp_path / "run"
    assert main(_sft(torch_backend, out, "sft.steps=1")) == 0
    f = ckpt.step_dir(out / "checkpoints", 1) / "model.safetensors"
    w = load_file(str(f))
    w["model.norm.weight"][2] = np.nan
    save_file(w, str(f), metadata={"format": "pt"})
    capsys.readouterr()
    assert main(_sft(torch_backend, out, "--resume", "sft.steps=2")) == 2
    err = capsys.readouterr().err
    assert "holds a non-finite weight (parameter 'model.norm.weight' (1 of" in err and "Traceback" not in err
