"""The run directory is cleared and written by one process: rank 0 of a ``torchrun`` job clears an earlier run
(``--overwrite``), the other ranks wait at a barrier and see it already cleared; the rank is read without a
framework import (``diptych.core.mesh.process_info``)."""

from __future__ import annotations

import json

import pytest

from diptych.core import mesh as M
from diptych.core.mesh import MeshError
from tests.distributed.conftest import HERE, run_worker, torchrun
from tests.train.helpers import needs_torch


def _earlier_run(out):
    root = out / "checkpoints"
    for step in range(1, 13):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "diptych.json").write_text("{}")
    (root / "reference").mkdir()
    (root / ".step_00000013.tmp-99").mkdir()  # a killed save's leftover
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    return root


@needs_torch
def test_two_torchrun_ranks_overwriting_a_run_do_not_race(tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    _earlier_run(out)
    run_worker(torchrun(2, str(HERE / "run_dir_worker.py"), str(out), str(logs)), timeout=300)
    r0, r1 = (json.loads((logs / f"rank{i}.json").read_text()) for i in (0, 1))
    assert (r0["rank"], r0["count"], r0["main"]) == (0, 2, True)
    assert (r1["rank"], r1["count"], r1["main"]) == (1, 2, False)
    assert r0["error"] is None and r1["error"] is None
    assert r0["used"] == r1["used"] and len(r0["used"]) == 2  # both saw the same earlier run: the same path
    assert len(r0["removed"]) == 13 and r1["removed"] == []  # 12 steps and the reference, by rank 0 alone
    assert r1["left_after_clear"] == [] and not r1["metrics_after_clear"]  # rank 1 waited for the clearing
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == []


def test_process_info_comes_from_the_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "DIPTYCH_PROCESS_ID", "DIPTYCH_NUM_PROCESSES", "JAX_PROCESS_ID",
                "JAX_NUM_PROCESSES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(M, "_PROCESS_INFO", [])
    assert M.process_info() == (0, 1) and M.is_main_process()
    monkeypatch.setenv("DIPTYCH_PROCESS_ID", "1")
    monkeypatch.setenv("DIPTYCH_NUM_PROCESSES", "2")
    assert M.process_info() == (1, 2) and not M.is_main_process()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(MeshError, match="RANK='x'"):
        M.process_info()


def test_one_process_runs_on_main_without_a_barrier(monkeypatch):
    monkeypatch.setattr(M, "_PROCESS_INFO", [lambda: (0, 1)])
    monkeypatch.setattr(M, "_BARRIER", [lambda: (_ for _ in ()).throw(AssertionError("no barrier for one"))])
    assert M.on_main_process(lambda: 7) == 7


def test_a_multi_process_job_without_a_backend_barrier_is_refused(monkeypatch):
    monkeypatch.setattr(M, "_PROCESS_INFO", [lambda: (1, 2)])
    monkeypatch.setattr(M, "_BARRIER", [])
    monkeypatch.setattr(M, "_BARRIER_PROVIDERS", ())
    ran = []
    with pytest.raises(MeshError, match="no backend provides a barrier"):
        M.on_main_process(lambda: ran.append(1))
    assert not ran  # not process 0: it never ran the write
