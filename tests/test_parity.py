"""`diptych parity`: the harness compares what it says it compares, and fails when it should."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import HAS_JAX, HAS_TORCH, needs_jax, needs_torch, needs_transformers

from diptych.cli import main
from diptych.parity.harness import compare, left_padded_batch, run_parity

both = pytest.mark.skipif(not (HAS_JAX and HAS_TORCH), reason="needs both backends")


def test_compare_judges_abs_and_rel_against_the_tolerance():
    x = np.array([1.0, 2.0, 3.0])
    ok = compare("logits", "a", "b", x + 5e-6, x, "float32")
    bad = compare("logits", "a", "b", x + 5e-5, x, "float32")
    assert ok.passed and not bad.passed
    assert bad.max_abs == pytest.approx(5e-5, rel=1e-6)
    assert bad.max_rel == pytest.approx(5e-5 / 3, rel=1e-6)
    nan = compare("logits", "a", "b", np.array([np.nan]), np.array([0.0]), "float32")
    assert not nan.passed and "non-finite" in nan.note
    shape = compare("logits", "a", "b", np.zeros(3), np.zeros(4), "float32")
    assert not shape.passed


def test_compare_ignores_masked_positions():
    x, y = np.zeros((2, 3, 4)), np.zeros((2, 3, 4))
    x[0, 0] = 100.0
    mask = np.array([[0, 1, 1], [1, 1, 1]])
    assert compare("logits", "a", "b", x, y, "float32", mask=mask).passed
    assert not compare("logits", "a", "b", x, y, "float32").passed


def test_left_padded_batch_is_left_padded():
    tokens, mask = left_padded_batch(50, [3, 5], seed=1)
    assert tokens.shape == (2, 5)
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert (tokens[mask == 0] == 0).all() and (tokens[mask == 1] > 0).all()


@both
@needs_transformers
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral", "smollm3"])
def test_parity_run_passes_on_every_pair(model_type):
    from diptych.core.spec import tiny_spec

    spec = tiny_spec(model_type, head_dim=16) if model_type == "qwen3" else tiny_spec(model_type)
    report = run_parity(spec, suites=["model"])
    pairs = {(c.quantity, c.a, c.b) for c in report.cases}
    assert ("logits", "jax", "torch") in pairs
    assert ("logits", "jax", "transformers") in pairs and ("logprobs", "torch", "transformers") in pairs
    assert report.passed, [c for c in report.cases if not c.passed]


@both
def test_parity_detects_a_broken_backend(monkeypatch):
    """A backend that is off by 1e-3 in one logit must FAIL the run, not pass it."""
    from diptych.core.backend import get_backend

    torch_backend = get_backend("torch")
    real_forward = torch_backend.forward

    def skewed(model, tokens, mask=None, **kw):
        out = real_forward(model, tokens, mask, **kw).clone()
        out[..., -1, 3] += 1e-3
        return out

    monkeypatch.setattr(torch_backend, "forward", skewed)
    report = run_parity(suites=["model"], with_transformers=False)
    failed = [c for c in report.cases if not c.passed]
    assert failed and all(c.quantity == "logits" for c in failed)


@needs_torch
@needs_jax
def test_cli_writes_json_and_exit_code(tmp_path):
    out = tmp_path / "parity.json"
    code = main(["parity", "--suite", "model", "--no-transformers", "--json", str(out)])
    data = json.loads(out.read_text())
    assert code == 0 and data["pass"] is True
    assert {"quantity", "a", "b", "dtype", "max_abs", "max_rel", "tol", "pass"} <= set(data["cases"][0])


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    code = main(["parity", "--checkpoint", str(tmp_path / "nope")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_rejects_unknown_suite(capsys):
    code = main(["parity", "--suite", "bogus", "--no-transformers"])
    assert code == 2 and "Unknown parity suite" in capsys.readouterr().err


# -- --checkpoint: transformers reads the user's own folder ----------------------------------------
@pytest.fixture
def llama3_folder(tmp_path):
    """A Llama 3.1-style folder written by transformers (rope_scaling llama3, attention_bias)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, attention_bias=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 4, "rope_theta": 100.0})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


@needs_torch
@needs_transformers
def test_checkpoint_parity_passes_and_lists_ignored_config_fields(llama3_folder, tmp_path):
    cfg = json.loads((llama3_folder / "config.json").read_text())
    cfg["my_new_switch"] = True  # a field no diptych spec reads
    (llama3_folder / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "r.json"
    code = main(["parity", "--checkpoint", str(llama3_folder), "--backend", "torch", "--suite", "model",
                 "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0 and report["pass"]
    assert report["ignored_config_fields"] == ["my_new_switch"]
    assert any(c["b"] == "transformers" or c["a"] == "transformers" for c in report["cases"])


@needs_torch
@needs_transformers
def test_checkpoint_parity_catches_a_config_field_diptych_drops(llama3_folder, monkeypatch):
    """Make diptych ignore rope_scaling: against its own re-export the run would still pass; against
    the user's folder the logits disagree and the run fails."""
    from diptych.core import hf
    from diptych.core.hf import load_hf_folder
    from diptych.core.spec import DecoderSpec

    def drop_rope_scaling(config):
        return DecoderSpec.from_hf_config({k: v for k, v in config.items()
                                           if k not in ("rope_scaling", "rope_parameters")})

    monkeypatch.setitem(hf.SPEC_FROM_CONFIG, "llama", drop_rope_scaling)
    spec, weights = load_hf_folder(llama3_folder)
    assert spec.rope_type == "default"
    own = run_parity(spec, weights, backends=["torch"], suites=["model"], lengths=(12, 7))
    assert own.passed  # the blind spot: diptych's export carries the same dropped field
    report = run_parity(spec, weights, backends=["torch"], suites=["model"], lengths=(12, 7),
                        checkpoint=llama3_folder)
    assert not report.passed
    assert any(not c.passed and "transformers" in (c.a, c.b) and c.quantity == "logits" for c in report.cases)


def test_num_steps_on_a_decoder_says_it_is_for_recurrent_models(capsys):
    code = main(["parity", "--model-type", "llama", "--num-steps", "4", "--no-transformers"])
    err = capsys.readouterr().err
    assert code == 2
    assert "recurrence depth of recurrent-depth models (huginn_raven)" in err and "Traceback" not in err
