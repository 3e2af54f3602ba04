"""Messages, not tracebacks (issue 13 item 5): each bad input of the issue gets one line on stderr that names
the key, file or checkpoint and the fix, and exit status 2; ``--debug`` shows the traceback instead."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import needs_torch

from diptych.cli import main
from diptych.core import checkpointing as ckpt
from diptych.core.config import ConfigError
from diptych.core.optim import OptimConfig
from diptych.core.spec import tiny_spec

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
        "data.task_knobs.digits=1", "data.n_train=16", "data.n_test=4"]
GRPO_TINY = [*TINY, "grpo.prompts_per_step=2", "grpo.num_generations=4", "grpo.max_prompt_length=6",
             "grpo.max_completion_length=4"]


def one_line(capsys, *argv: str) -> str:
    """Run ``diptych train ...``: exit 2 and exactly one error line (deprecation notices aside), no traceback."""
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("diptych train")]
    assert len(lines) == 1, err
    return lines[0]


@needs_torch
@pytest.mark.parametrize("typo", ["lerning_rate", "learning_rate", "learningrate"])
def test_learning_rate_typos_suggest_lr(capsys, typo):
    line = one_line(capsys, "grpo", "--backend", "torch", f"grpo.optim.{typo}=1e-5")
    assert f"'grpo.optim.{typo}'" in line and "Did you mean 'lr'?" in line


@needs_torch
def test_temperature_zero_names_the_key(capsys):
    line = one_line(capsys, "grpo", "--backend", "torch", "grpo.temperature=0")
    assert "grpo.temperature must be a finite number > 0, got 0.0" in line
    assert "ppo.temperature must be" in one_line(capsys, "ppo", "--backend", "torch", "ppo.temperature=0")


@needs_torch
def test_negative_steps_are_refused_not_done(capsys):
    assert "grpo.steps must be >= 1, got -3" in one_line(capsys, "grpo", "--backend", "torch", "grpo.steps=-3")
    assert "sft.steps must be >= 1" in one_line(capsys, "sft", "--backend", "torch", "sft.steps=-3")


@needs_torch
@pytest.mark.parametrize("key", ["grpo.max_new_tokens", "grpo.max_completion_length"])
def test_zero_completion_length_is_refused(capsys, key):
    """Before: AttributeError deep in the sampler (``max_new_tokens`` is the deprecated name)."""
    line = one_line(capsys, "grpo", "--backend", "torch", f"{key}=0")
    assert "grpo.max_completion_length must be >= 1, got 0" in line


@needs_torch
def test_non_utf8_byte_in_a_dataset_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "rows.jsonl"
    bad.write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "caf\xe9=", "answer": "3"}\n')
    line = one_line(capsys, "grpo", "--backend", "torch", f"out={tmp_path / 'run'}", f"data.path={bad}", *GRPO_TINY)
    assert f"{bad}:2: byte 0xe9" in line and "not valid UTF-8" in line
    bad_json = tmp_path / "rows.json"
    bad_json.write_bytes(b'[{"prompt": "1+1=", "answer": "2"},\n {"prompt": "\xff", "answer": "3"}]')
    line = one_line(capsys, "grpo", "--backend", "torch", f"data.path={bad_json}", *GRPO_TINY)
    assert f"{bad_json}:2: byte 0xff at column 14" in line


@needs_torch
def test_an_over_long_prompt_is_found_before_the_first_step(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    lines = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(30)]
    lines[27]["prompt"] = "123456789+1="  # 12 characters, over max_prompt_length=6; drawn late, if ever
    rows.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "run"
    line = one_line(capsys, "grpo", "--backend", "torch", f"out={out}", f"data.path={rows}", *GRPO_TINY)
    assert "row 27" in line and "12 tokens, over grpo.max_prompt_length=6" in line and "Raise" in line
    assert not (out / "metrics.jsonl").exists()


@needs_torch
def test_resume_with_the_other_backend_names_the_checkpoint_backend_and_the_fix(tmp_path, capsys):
    out = tmp_path / "run"
    step = ckpt.step_dir(out / "checkpoints", 2)
    step.mkdir(parents=True)
    spec = tiny_spec("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    ckpt.write_metadata(step, backend="jax", step=2, spec=spec, optim=OptimConfig(), extra={}, user={"config": {}})
    line = one_line(capsys, "sft", "--backend", "torch", "--resume", f"out={out}", *TINY)
    assert "is a jax checkpoint" in line and "--backend jax" in line and "diptych convert" in line


@needs_torch
def test_debug_shows_the_traceback_instead(capsys):
    with pytest.raises(ConfigError, match="Did you mean 'lr'"):
        main(["--debug", "train", "grpo", "--backend", "torch", "grpo.optim.lerning_rate=1"])
    with pytest.raises(ValueError, match=r"grpo\.steps must be >= 1"):
        main(["train", "grpo", "--backend", "torch", "--debug", "grpo.steps=-3"])


def _hf_folder(tmp_path):
    from diptych.core.hf import save_hf_folder
    from diptych.core.tokenizer import CharTokenizer

    spec = tiny_spec("llama", vocab_size=CharTokenizer().vocab_size, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=1)
    return spec, save_hf_folder(tmp_path / "hf", spec, spec.init_weights(0))


@needs_torch
def test_a_truncated_model_safetensors_is_one_line(tmp_path, capsys):
    """Before: a 29-line SafetensorError traceback."""
    _, folder = _hf_folder(tmp_path)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    line = one_line(capsys, "sft", "--backend", "torch", f"model.path={folder}", *TINY)
    assert f"{f} is not a readable safetensors file" in line and "truncated or corrupt" in line


@needs_torch
def test_a_nan_weight_in_model_path_is_refused_at_load_naming_the_parameter(tmp_path, capsys):
    from diptych.core.hf import save_hf_folder

    spec, folder = _hf_folder(tmp_path)
    w = spec.init_weights(0)
    w["model.layers.0.mlp.up_proj.weight"][3, 4] = np.nan
    save_hf_folder(folder, spec, w)
    line = one_line(capsys, "sft", "--backend", "torch", f"model.path={folder}", *TINY)
    assert "parameter 'model.layers.0.mlp.up_proj.weight' (1 of" in line and "NaN or inf" in line
