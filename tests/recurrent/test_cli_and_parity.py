"""`diptych depth-sweep`, `diptych parity` on a Huginn folder, and the recurrent parity suite."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diptych.core.hf import save_hf_folder
from diptych.core.recurrent_spec import tiny_recurrent_spec
from tests.conftest import needs_jax, needs_torch


def _checkpoint(tmp_path):
    from diptych.recipes.recurrent_pretrain import CharCodec

    codec = CharCodec("sum =0123456789")
    spec = tiny_recurrent_spec(vocab_size=codec.vocab_size, n_layers_in_recurrent_block=1, block_size=64)
    folder = save_hf_folder(tmp_path / "ckpt", spec, spec.init_weights(0))
    codec.save(folder, "running_sum", {"length": [2, 4], "modulo": 10})
    return folder, spec


@needs_torch
def test_depth_sweep_cli_writes_json_and_png(tmp_path):
    from diptych.cli import main

    folder, _ = _checkpoint(tmp_path)
    rc = main(["depth-sweep", "--checkpoint", str(folder), "--task", "running_sum", "--steps", "1,3",
               "--criteria", "latent-diff", "--n", "12", "--backend", "torch",
               "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
    assert rc == 0
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [(r["mode"], r["num_steps"]) for r in rows] == [("fixed", 1), ("adaptive:latent-diff", 1), ("fixed", 3),
                                                            ("adaptive:latent-diff", 3)]
    assert all(0 <= r["accuracy"] <= 1 for r in rows) and rows[2]["mean_depth"] == 3
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_depth_sweep_cli_rejects_bad_steps_and_missing_codec(tmp_path, capsys):
    from diptych.cli import main

    folder, spec = _checkpoint(tmp_path)
    assert main(["depth-sweep", "--checkpoint", str(folder), "--steps", "1,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["depth-sweep", "--checkpoint", str(folder), "--criteria", "vibes"]) == 2
    assert "unknown exit criteria" in capsys.readouterr().err
    bare = save_hf_folder(tmp_path / "bare", spec, spec.init_weights(0))
    assert main(["depth-sweep", "--checkpoint", str(bare)]) == 2
    assert "diptych_codec.json" in capsys.readouterr().err


@needs_jax
@needs_torch
def test_recurrent_parity_suite_passes_on_a_tiny_model():
    from diptych.parity.harness import Context, left_padded_batch
    from diptych.parity.recurrent_suite import recurrent_cases

    spec = tiny_recurrent_spec(n_layers_in_recurrent_block=1, mean_recurrence=5, mean_backprop_depth=2)
    tokens, mask = left_padded_batch(spec.vocab_size, [5, 3], seed=0)
    ctx = Context(spec, spec.init_weights(0), "float32", ["jax", "torch"], tokens, mask)
    cases = recurrent_cases(ctx)
    assert len(cases) == 3 and all(c.passed for c in cases), [c.as_json() for c in cases]
    assert recurrent_cases(Context(object(), {}, "float32", [], tokens, mask)) == []


@needs_jax
@needs_torch
def test_diptych_parity_compares_backends_on_a_huginn_folder(tmp_path):
    from diptych.cli import main

    folder, _ = _checkpoint(tmp_path)
    rc = main(["parity", "--checkpoint", str(folder), "--num-steps", "3", "--suite", "model",
               "--json", str(tmp_path / "p.json")])
    report = json.loads((tmp_path / "p.json").read_text())
    assert rc == 0 and report["pass"], report
    assert {c["quantity"] for c in report["cases"]} >= {"logits", "logprobs"}


@pytest.mark.parametrize("backend_name", [pytest.param("jax", marks=needs_jax),
                                          pytest.param("torch", marks=needs_torch)])
def test_truncated_trainer_lowers_the_loss_on_a_fixed_batch(backend_name):
    import importlib

    rb = importlib.import_module(f"diptych.backends.{backend_name}.recurrent")
    spec = tiny_recurrent_spec(n_layers_in_recurrent_block=1, vocab_size=16)
    model = rb.build(spec, spec.init_weights(0))
    trainer = rb.TruncatedTrainer(model, lr=3e-3)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 16, (4, 6))
    mask = np.ones_like(tokens)
    w = np.ones(tokens.shape, np.float32)
    losses = [trainer.step(tokens, mask, np.roll(tokens, -1, 1), w, num_steps=3, num_grad_steps=2) for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0]


def test_parity_tolerance_follows_the_unrolled_depth():
    from diptych.core.recurrent_spec import tiny_recurrent_spec
    from diptych.parity.harness import logits_tolerance

    spec = tiny_recurrent_spec()  # DESIGN.md: 1e-5 for tiny models, 1e-4 at real sizes
    shallow = 16 - spec.n_layers_in_prelude - spec.n_layers_in_coda
    assert logits_tolerance(spec, shallow // spec.n_layers_in_recurrent_block, "float32") == 1e-5
    assert logits_tolerance(spec, 16, "float32") == 1e-4
    assert logits_tolerance(spec, 16, "bfloat16") is None  # bf16 keeps its own table entry
