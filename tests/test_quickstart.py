"""`diptych quickstart`: runs end to end on each backend, and (slow) GRPO really raises held-out accuracy."""

from __future__ import annotations

import json

import pytest

from diptych.cli import main
from diptych.commands.quickstart import QuickstartConfig, carry_free_sum, quickstart, warm_start_rows
from diptych.core.plotting import moving_average
from diptych.core.tasks import get_task

BACKENDS = ["jax", "torch"]


def tiny_config(**overrides) -> QuickstartConfig:
    """A quickstart small enough for a test (~5 s on torch) that still learns some 1-digit sums (~10% held out)."""
    base = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64, n_train=400, n_test=40, sft_steps=120, sft_batch=32, grpo_steps=2,
                prompts_per_step=4, group_size=4, task_knobs={"digits": (1, 1), "ops": ("+",)}, sft_carry_bug=0.0)
    return QuickstartConfig(**{**base, **overrides})


def run_tiny(name: str, out) -> dict:
    from diptych.core.backend import get_backend

    if name == "torch":
        import torch

        torch.set_num_threads(1)
    return quickstart(get_backend(name), tiny_config(), out=out, console=False)


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
    # The run leaves a model to use: an HF folder with the char tokenizer, the native state inside it.
    final = out / "final"
    assert result["final"] == str(final)
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "diptych_eval.json"} <= {
        p.name for p in final.iterdir()}
    assert json.loads((final / "checkpoint" / "diptych.json").read_text())["backend"] == name
    # The curve data: the moving average of the logged rewards, and the three held-out accuracies marked.
    panels = {p["key"]: p for p in json.loads((out / "curves.json").read_text())}
    assert panels["reward"]["raw"] == [r["reward"] for r in grpo_rows]
    assert panels["reward"]["smooth"] == moving_average(panels["reward"]["raw"], panels["reward"]["window"])
    assert [(m["x"], m["y"]) for m in panels["reward"]["markers"]] == [
        (0.0, result["accuracy_initial"]), (0.0, result["accuracy_before"]), (2.0, result["accuracy_after"])]
    assert panels["reward"]["ylabel"] == "reward (fraction of sums right)"


def test_quickstart_prints_the_commands_to_use_its_model(tmp_path, capsys) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "run"
    assert main(["quickstart", "--backend", "torch", "--sft-steps", "1", "--grpo-steps", "1", "--quiet",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    final = out / "final"
    assert f'diptych sample --backend torch --checkpoint {final} --prompt "12+7=" --temperature 0' in text
    assert f"diptych evaluate --backend torch --checkpoint {final}" in text
    assert f"diptych convert {final / 'checkpoint'} {out / 'final-jax'} --to jax" in text


def _reloaded_accuracy(trained_on: str, tmp_path) -> None:
    from diptych.commands.evaluate import evaluate_checkpoint
    from diptych.commands.sample import eval_settings
    from diptych.core.backend import get_backend

    result = run_tiny(trained_on, tmp_path / "run")
    final = tmp_path / "run" / "final"
    settings = eval_settings(final)
    assert settings["accuracy"] == result["accuracy_after"] and settings["n"] == 40
    assert result["accuracy_after"] > 0, result       # some right answers, so matching figures mean something
    for name in BACKENDS:
        pytest.importorskip("torch" if name == "torch" else "flax")
        for folder in (final, final / "checkpoint"):           # the HF folder and the native checkpoint
            figures = evaluate_checkpoint(get_backend(name), folder, settings)
            assert figures["accuracy"] == pytest.approx(result["accuracy_after"], abs=1e-9), (name, folder)


def test_saved_model_reloads_on_both_backends_with_the_printed_accuracy(tmp_path) -> None:
    pytest.importorskip("torch")
    _reloaded_accuracy("torch", tmp_path)


@pytest.mark.slow
def test_jax_trained_model_reloads_on_both_backends(tmp_path) -> None:
    pytest.importorskip("flax")
    _reloaded_accuracy("jax", tmp_path)


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
