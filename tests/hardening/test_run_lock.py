"""One owner per run directory (issue 13 item 3): a second run on a held ``out`` fails at once naming the holder,
the kernel frees the lock when the holder dies, and a fresh run into a used ``out`` refuses unless --overwrite
(which clears the old run first, so the new run's checkpoints are not pruned as 'older')."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import needs_torch

from diptych.cli import main
from diptych.core.trainers.runner import LOCK_FILE, RunLock, RunLockError

SFT_TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
            "data.task_knobs.digits=1", "data.n_train=16", "data.n_test=4", "sft.batch_size=4",
            "sft.max_prompt_length=6", "sft.max_completion_length=4", "sft.optim.lr=1e-3"]

HOLDER = """
import sys, time
from diptych.core.trainers.runner import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _holder(out: Path) -> subprocess.Popen:
    """Another process holding ``out``'s run lock (as a live ``diptych train`` would)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "locked"
    return p


def _sft(out: Path, *extra: str) -> list[str]:
    return ["train", "sft", "--backend", "torch", "--quiet", f"out={out}", *SFT_TINY, *extra]


@needs_torch
def test_second_run_on_a_held_out_fails_at_once_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        t0 = time.perf_counter()
        assert main(_sft(out, "sft.steps=2")) == 2
        err = capsys.readouterr().err
        assert time.perf_counter() - t0 < 30
        assert f"pid {holder.pid}" in err and "in use by another run" in err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
        holder.send_signal(signal.SIGKILL)  # kill -9: the kernel drops the flock; the stale file blocks nobody
        holder.wait(timeout=30)
        assert (out / LOCK_FILE).is_file()
        assert main(_sft(out, "sft.steps=2")) == 0
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_lock_is_exclusive_within_a_process_and_released_after_the_run(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    first.release()
    with RunLock(tmp_path):
        held = json.loads((tmp_path / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["host"] and held["started"]


@needs_torch
def test_fresh_run_into_a_used_out_refuses_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_sft(out, "sft.steps=4", "checkpoint.every=1", "checkpoint.keep_last=2")) == 0
    metrics = (out / "metrics.jsonl").read_text()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000003", "step_00000004"]
    capsys.readouterr()

    assert main(_sft(out, "sft.steps=2", "checkpoint.every=1", "checkpoint.keep_last=2")) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err and "step_00000004" in err
    assert (out / "metrics.jsonl").read_text() == metrics  # nothing of the old run was touched
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ckpts

    assert main(_sft(out, "--overwrite", "sft.steps=2", "checkpoint.every=1", "checkpoint.keep_last=2")) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # the new run's own checkpoints survive (before: the old run's step 3/4 made them the "oldest" to prune)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")) == [
        "step_00000001", "step_00000002"]


@needs_torch
def test_quickstart_on_a_held_out_fails_at_once(tmp_path, capsys):
    out = tmp_path / "qs"
    holder = _holder(out)
    try:
        assert main(["quickstart", "--backend", "torch", "--quiet", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and err.count("\n") == 1
        assert not (out / "final").exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
