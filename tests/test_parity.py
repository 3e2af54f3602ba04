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
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
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
