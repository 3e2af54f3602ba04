"""``torchrun ... diptych train --mesh``: the CLI trains sharded, logs once (rank 0), writes sharded checkpoints
and resumes from them, with the losses of the one-process run of the same config."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.distributed.conftest import run_worker, torchrun
from tests.train.helpers import needs_torch

pytestmark = [pytest.mark.slow, needs_torch]

DIPTYCH = str(Path(sys.executable).parent / "diptych")
TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1", "data.n_train=16",
        "data.n_test=4", "sft.batch_size=4", "checkpoint.every=1"]


def _losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # one writer: no duplicated rows
    return [r["loss"] for r in rows]


def test_torchrun_sft_on_two_processes_matches_one_process_and_resumes(tmp_path):
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    args = ["train", "sft", "--backend", "torch", "--quiet", *TINY]
    run_worker(torchrun(2, "--no-python", DIPTYCH, *args, "--mesh", "fsdp=2", f"out={sharded}", "sft.steps=2"),
               timeout=600)
    assert (sharded / "checkpoints" / "step_00000002" / "dcp").is_dir()  # each rank wrote its shards
    run_worker(torchrun(2, "--no-python", DIPTYCH, *args, "--mesh", "fsdp=2", f"out={sharded}", "sft.steps=3",
                        "--resume"), timeout=600)
    run_worker([DIPTYCH, *args, f"out={single}", "sft.steps=3"], timeout=600)
    got, want = _losses(sharded), _losses(single)
    assert len(got) == len(want) == 3
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_torchrun_overwrite_is_cleared_by_rank_0_while_the_other_waits(tmp_path):
    """Two ranks on ``--overwrite``: the earlier run's checkpoints and metrics are cleared once (by rank 0, the
    other at the barrier), and the new run's rows and checkpoints are all that is left."""
    out = tmp_path / "run"
    args = ["train", "sft", "--backend", "torch", "--quiet", *TINY, "--mesh", "fsdp=2", f"out={out}"]
    run_worker(torchrun(2, "--no-python", DIPTYCH, *args, "sft.steps=3"), timeout=600)
    assert len(_losses(out)) == 3
    run_worker(torchrun(2, "--no-python", DIPTYCH, *args, "sft.steps=1", "--overwrite"), timeout=600)
    assert len(_losses(out)) == 1  # one writer, and the earlier rows gone
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]


def test_torchrun_grpo_with_a_reference_model_matches_one_process(tmp_path):
    """beta > 0 builds the reference from the sharded policy (gathered by export_weights; rank 0 writes it)."""
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    args = ["train", "grpo", "--backend", "torch", "--quiet", "model.hidden_size=32", "model.intermediate_size=64",
            "model.num_hidden_layers=1", "data.n_train=16", "data.n_test=4", "grpo.prompts_per_step=2",
            "grpo.num_generations=2", "grpo.max_completion_length=4", "grpo.beta=0.04", "grpo.parity=true",
            "grpo.steps=2"]
    run_worker(torchrun(2, "--no-python", DIPTYCH, *args, "--mesh", "fsdp=2", f"out={sharded}"), timeout=600)
    assert (sharded / "checkpoints" / "reference" / "config.json").is_file()
    run_worker([DIPTYCH, *args, f"out={single}"], timeout=600)
    np.testing.assert_allclose(_losses(sharded), _losses(single), rtol=1e-4, atol=1e-6)
