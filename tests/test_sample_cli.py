"""`diptych sample` end to end on the embedded tiny model and on a checkpoint folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diptych.cli import main
from diptych.core.sampling import SamplingConfig
from tests.conftest import needs_jax, needs_torch


def run_cli(capsys, *argv: str) -> tuple[int, list[str], str]:
    rc = main(["sample", *argv])
    out = capsys.readouterr()
    return rc, [line for line in out.out.splitlines() if line.strip()], out.err


@needs_torch
def test_greedy_cli_output_equals_backend_generate(capsys):
    from diptych.commands.sample import load_model_and_tokenizer
    from diptych.core.backend import get_backend

    rc, lines, _ = run_cli(capsys, "--backend", "torch", "--prompt", "12+3=", "--max-new-tokens", "6",
                           "--temperature", "0", "--json")
    assert rc == 0 and len(lines) == 1
    row = json.loads(lines[0])
    backend = get_backend("torch")
    model, tok = load_model_and_tokenizer(backend, None)
    ro = backend.generate(model, [tok.encode("12+3=", add_special_tokens=True)],
                          SamplingConfig(max_new_tokens=6, temperature=0, eos_ids=(tok.eos_id,), pad_id=tok.pad_id))
    assert row["tokens"] == ro.completions()[0]
    assert row["completion"] == tok.decode(ro.completions()[0])
    assert row["prompt"] == "12+3=" and row["sample"] == 0


@needs_torch
def test_prompts_file_and_n_samples_give_contiguous_groups(capsys, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "ab"}) + "\n\n" + json.dumps("cd") + "\n")
    rc, lines, _ = run_cli(capsys, "--backend", "torch", "--prompts-file", str(f), "--n", "2",
                           "--max-new-tokens", "4", "--json", "--top-k", "5")
    assert rc == 0
    rows = [json.loads(line) for line in lines]
    assert [(r["prompt"], r["sample"]) for r in rows] == [("ab", 0), ("ab", 1), ("cd", 0), ("cd", 1)]
    assert all(len(r["tokens"]) <= 4 for r in rows)


@needs_torch
def test_checkpoint_folder_without_tokenizer_uses_char_tokenizer(capsys, tmp_path):
    from diptych.core.hf import save_hf_folder
    from diptych.core.spec import tiny_spec

    spec = tiny_spec("qwen3")
    save_hf_folder(tmp_path / "ckpt", spec, spec.init_weights(1))
    rc, lines, err = run_cli(capsys, "--backend", "torch", "--checkpoint", str(tmp_path / "ckpt"),
                             "--prompt", "hi", "--max-new-tokens", "3")
    assert rc == 0 and len(lines) == 1 and lines[0].startswith("[0] hi")
    assert "char tokenizer" in err


@needs_jax
def test_jax_backend_runs(capsys):
    rc, lines, _ = run_cli(capsys, "--backend", "jax", "--prompt", "x", "--max-new-tokens", "3", "--json")
    assert rc == 0 and len(json.loads(lines[0])["tokens"]) <= 3
    assert np.isfinite(json.loads(lines[0])["logprob"])


@needs_torch
@pytest.mark.parametrize("flags, msg", [(("--top-p", "0"), "top_p"), (("--temperature", "-1"), "temperature")])
def test_bad_flags_give_a_clear_error(capsys, flags, msg):
    rc, _, err = run_cli(capsys, "--backend", "torch", "--prompt", "x", *flags)
    assert rc == 2 and msg in err


def test_missing_prompts_file_is_reported(capsys, tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["sample", "--backend", "torch", "--prompts-file", str(tmp_path / "nope.jsonl")])
