"""`diptych quickstart`: runs end to end on each backend, and (slow) GRPO really raises held-out accuracy."""

from __future__ import annotations

import json

import pytest

from diptych.cli import main
from diptych.commands.quickstart import QuickstartConfig, carry_free_sum, quickstart, warm_start_rows
from diptych.core.tasks import get_task

BACKENDS = ["jax", "torch"]


def test_carry_free_sum_drops_every_carry() -> None:
    # Hand-computed: 47+38 -> 7|15 -> 75; 95+17 -> 10|12 -> 02; 7+5 -> 2; no carry -> the true sum.
    assert carry_free_sum(47, 38) == 75
    assert carry_free_sum(95, 17) == 2
    assert carry_free_sum(7, 5) == 2
    assert carry_free_sum(42, 31) == 73
    assert carry_free_sum(0, 0) == 0


def test_warm_start_bug_touches_only_carry_sums() -> None:
    task = get_task("arithmetic", digits=(1, 2), ops=("+",))
    rows = task.generate("train", 600, 0)
    clean = warm_start_rows(task, rows, 0.0, seed=0)
    assert [r["completion"] for r in clean] == [r["answer"] for r in rows]
    buggy = warm_start_rows(task, rows, 1.0, seed=0)
    for r, b in zip(rows, buggy):
        carries = carry_free_sum(r["a"], r["b"]) != r["a"] + r["b"]
        assert b["completion"] == (str(carry_free_sum(r["a"], r["b"])) if carries else r["answer"])
    half = warm_start_rows(task, rows, 0.5, seed=0)
    wrong = sum(h["completion"] != r["answer"] for h, r in zip(half, rows))
    n_carry = sum(carry_free_sum(r["a"], r["b"]) != r["a"] + r["b"] for r in rows)
    assert 0.35 * n_carry < wrong < 0.65 * n_carry


@pytest.mark.parametrize("name", BACKENDS)
def test_quickstart_cli_writes_json_plot_and_metrics(name: str, tmp_path) -> None:
    pytest.importorskip("torch" if name == "torch" else "flax")
    out, js = tmp_path / "run", tmp_path / "result.json"
    rc = main(["quickstart", "--backend", name, "--sft-steps", "3", "--grpo-steps", "2", "--quiet",
               "--out", str(out), "--json", str(js)])
    assert rc == 0
    result = json.loads(js.read_text())
    assert {"backend", "accuracy_before", "accuracy_after", "seconds"} <= set(result)
    assert result["backend"] == name
    assert 0.0 <= result["accuracy_before"] <= 1.0 and 0.0 <= result["accuracy_after"] <= 1.0
    assert result["seconds"] > 0
    assert (out / "curves.png").stat().st_size > 0
    grpo_rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in grpo_rows] == [1, 2] and "reward" in grpo_rows[0]
    assert len((out / "sft" / "metrics.jsonl").read_text().splitlines()) == 3


def test_quickstart_rejects_unknown_backend(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["quickstart", "--backend", "numpy"])
    assert "invalid choice" in capsys.readouterr().err


# Measured with the defaults (accuracy after SFT -> after GRPO, 200 held-out prompts): torch seed 0
# 59.5% -> 73.5%, seed 1 56.5% -> 63.5%, seed 2 68.5% -> 79.0%;
# jax seed 0 63.0% -> 74.5%, seed 1 59.5% -> 71.5%. The smallest gain seen was +7 points;
# 0.03 leaves room for seed and CPU float noise without letting "no gain" pass.
@pytest.mark.slow
@pytest.mark.parametrize("name", BACKENDS)
def test_quickstart_default_grpo_raises_held_out_accuracy(name: str) -> None:
    pytest.importorskip("torch" if name == "torch" else "flax")
    from diptych.core.backend import get_backend

    if name == "torch":
        import torch

        torch.set_num_threads(1)
    result = quickstart(get_backend(name), QuickstartConfig(), out=None, console=False)
    assert result["accuracy_after"] > result["accuracy_before"] + 0.03, result
