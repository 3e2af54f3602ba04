"""The pretraining recipe end to end, shrunk to a few steps (the real run is in the README)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diptych.recipes.recurrent_pretrain import CharCodec, RecipeConfig, _encode, run
from tests.conftest import BACKENDS, needs_torch


def test_dense_targets_are_running_sums_and_the_answer():
    codec = CharCodec("sum =0123456789")
    rows = [{"prompt": "sum 385=", "answer": "6", "digits": [3, 8, 5]}, {"prompt": "sum 19=", "answer": "0",
                                                                         "digits": [1, 9]}]
    tokens, mask, targets, weights, answers = _encode(codec, rows, dense=True)
    inv = {v: k for k, v in codec.index.items()}
    assert [inv[t] for t, w in zip(targets[0], weights[0]) if w] == ["3", "1", "6", "6"]
    assert [inv[t] for t, w in zip(targets[1], weights[1]) if w] == ["1", "0", "0"]
    assert mask[1, 0] == 0 and tokens[1, 0] == 0 and np.array_equal(answers, [codec.index["6"], codec.index["0"]])
    only = _encode(codec, rows, dense=False)[3]
    assert only.sum() == 2 and only[:, -1].all()


@pytest.mark.slow
@needs_torch
def test_recipe_runs_end_to_end_and_writes_results(tmp_path):
    cfg = RecipeConfig(steps=4, warmup=1, batch=8, eval_size=8, eval_depths=(1, 2), out=str(tmp_path / "run"))
    results = run(cfg, log=lambda *_: None)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["params"] == results["params"] and {"sweep", "sweep_long", "baseline"} <= set(saved)
    assert (tmp_path / "run" / "checkpoint" / "diptych_codec.json").is_file()
    assert (tmp_path / "run" / "sweep.png").is_file()


def test_cli_length_flags_parse_and_reject_bad_ranges():
    import argparse

    from diptych.recipes.recurrent_pretrain import _ints, _pair

    assert _pair("4,12") == (4, 12) and _ints("1,2,4") == (1, 2, 4)
    for bad in ("12,4", "0,3", "4", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected"):
            _pair(bad)


def test_word_problem_targets_are_prefix_products():
    from diptych.core.tasks.word_problem import compose
    from diptych.recipes.recurrent_pretrain import TASKS

    codec = CharCodec(TASKS["word_problem"]["chars"])
    row = {"prompt": "mul 4355=", "answer": "0", "factors": [4, 3, 5, 5], "trace": [4, 0, 5, 0]}
    assert compose(compose(compose(4, 3), 5), 5) == 0  # the row is consistent with the group law
    _, mask, targets, weights, _ = _encode(codec, [row, {**row, "prompt": "mul 43=", "factors": [4, 3],
                                                                    "trace": [4, 0], "answer": "0"}], dense=True)
    inv = {v: k for k, v in codec.index.items()}
    assert [inv[t] for t, w in zip(targets[0], weights[0]) if w] == ["4", "0", "5", "0", "0"]
    assert [inv[t] for t, w in zip(targets[1], weights[1]) if w] == ["4", "0", "0"]  # left padding shifts labels
    assert weights[1, :2].sum() == 0 and mask[1, :2].sum() == 0


def test_perm_chain_targets_sit_where_each_table_ends():
    from diptych.recipes.recurrent_pretrain import TASKS

    codec = CharCodec(TASKS["perm_chain"]["chars"])
    row = {"prompt": "3:DHKTV,EGMSU=", "answer": "0", "trace": [4, 0]}
    tokens, _, targets, weights, _ = _encode(codec, [row], dense=True)
    inv = {v: k for k, v in codec.index.items()}
    assert [(inv[int(tokens[0, i])], inv[int(targets[0, i])]) for i in np.flatnonzero(weights[0])] == [
        (",", "4"), ("=", "0")]


def test_lr_schedule_flags_parse_into_the_config():
    from diptych.recipes.recurrent_pretrain import parse_config

    cfg = parse_config(["--lr", "3e-3", "--lr-schedule", "cosine", "--warmup", "50", "--min-lr-ratio", "0.1",
                        "--clip", "0.5", "--steps", "200"])
    assert (cfg.lr, cfg.lr_schedule, cfg.warmup, cfg.min_lr_ratio, cfg.clip, cfg.steps) == (3e-3, "cosine", 50, 0.1,
                                                                                          0.5, 200)
    with pytest.raises(SystemExit):
        parse_config(["--lr-schedule", "step"])


def test_lr_table_is_warmup_then_cosine_by_hand():
    from diptych.recipes.recurrent_pretrain import lr_table

    cfg = RecipeConfig(lr=1e-2, warmup=4, lr_schedule="cosine", min_lr_ratio=0.1, steps=10)
    table = lr_table(cfg)
    # warmup: lr * (step + 1) / 4; then cosine over steps 4..10 from 1e-2 to 1e-3
    cosine = [1e-3 + 9e-3 * 0.5 * (1 + np.cos(np.pi * k / 6)) for k in (1, 2, 3, 4, 5)]
    hand = [2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, *cosine]
    np.testing.assert_allclose(table, hand, rtol=1e-6)
    assert table[4] == pytest.approx(1e-2) and table[7] == pytest.approx(5.5e-3)  # the cosine's midpoint
    np.testing.assert_allclose(lr_table(RecipeConfig(lr=2e-3, steps=5, warmup=0, lr_schedule="constant")), [2e-3] * 5)


def test_bad_schedule_fails_before_training(tmp_path):
    from diptych.core.config import ConfigError

    with pytest.raises(ValueError, match=r"--warmup \(10\) must be below --steps \(10\)"):
        run(RecipeConfig(steps=10, warmup=10, lr_schedule="linear", out=str(tmp_path)), log=lambda *_: None)
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        run(RecipeConfig(steps=10, warmup=2, lr_schedule="linear", min_lr_ratio=2.0, out=str(tmp_path)),
            log=lambda *_: None)
    with pytest.raises(ValueError, match="clip must be > 0"):
        run(RecipeConfig(clip=0.0, out=str(tmp_path)), log=lambda *_: None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_trainer_steps_with_the_scheduled_lr(backend):
    """Adam's oracle: with zero gradient for the first steps, one real step at update t moves each weight
    by exactly lr_t * (0.1 / (1 - 0.9^t)) / sqrt(0.05 / (1 - 0.95^t)) (betas 0.9, 0.95; the largest
    gradients reach that bound), so the step's displacement reads back the learning rate it used."""
    import importlib

    from diptych.core.recurrent_spec import tiny_recurrent_spec
    from diptych.recipes.recurrent_pretrain import make_trainer

    spec = tiny_recurrent_spec(vocab_size=16, n_embd=16, intermediate_size=32, n_heads=2, block_size=16)
    rb = importlib.import_module(f"diptych.backends.{backend}.recurrent")
    cfg = RecipeConfig(backend=backend, lr=1e-2, warmup=4, lr_schedule="linear", steps=8)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 16, (2, 6)).astype(np.int32)
    mask, targets = np.ones_like(tokens), rng.integers(1, 16, (2, 6)).astype(np.int32)
    for t, lr in ((1, 2.5e-3), (4, 1e-2)):  # update 0 (lr / 4) and the last warmup update (the peak)
        model = rb.build(spec, spec.init_weights(0))
        trainer, set_lr = make_trainer(cfg, rb, model)
        for step in range(t):
            w = np.ones(tokens.shape, np.float32) if step == t - 1 else np.zeros(tokens.shape, np.float32)
            before = rb.export(model)
            set_lr(step)
            trainer.step(tokens, mask, targets, w, num_steps=2, num_grad_steps=2)
        moved = max(float(np.abs(rb.export(model)[k] - before[k]).max()) for k in before)
        assert moved == pytest.approx(lr * (0.1 / (1 - 0.9**t)) / np.sqrt(0.05 / (1 - 0.95**t)), rel=1e-3)


def test_length_curriculum_grows_the_longest_list_by_hand():
    from diptych.recipes.recurrent_pretrain import _task, curriculum_length, parse_config

    cfg = RecipeConfig(length=(2, 24), length_ramp=10, length_start=8)
    # 8 + ceil(16 * step / 10): 8, 10, 12, ..., 23 at step 9, then the whole range
    assert [curriculum_length(cfg, s)[1] for s in (0, 1, 5, 9, 10, 500)] == [8, 10, 16, 23, 24, 24]
    assert curriculum_length(RecipeConfig(length=(2, 24)), 0) == (2, 24)  # off by default
    rows = _task(cfg, curriculum_length(cfg, 1)).generate("train", 64, seed=3)
    assert max(r["length"] for r in rows) <= 10 and min(r["length"] for r in rows) >= 2
    cli = parse_config(["--length-ramp", "300", "--length-start", "4", "--weight-decay", "0.1"])
    assert (cli.length_ramp, cli.length_start, cli.weight_decay) == (300, 4, 0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_decay_shrinks_weights_by_lr_times_decay(backend):
    """With zero gradient Adam's update is zero, so one step leaves exactly AdamW's decoupled decay:
    every weight times (1 - lr * weight_decay), on both backends."""
    import importlib

    from diptych.core.recurrent_spec import tiny_recurrent_spec
    from diptych.recipes.recurrent_pretrain import make_trainer

    spec = tiny_recurrent_spec(vocab_size=16, n_embd=16, intermediate_size=32, n_heads=2, block_size=16)
    rb = importlib.import_module(f"diptych.backends.{backend}.recurrent")
    cfg = RecipeConfig(backend=backend, lr=1e-2, weight_decay=0.5, steps=2)
    model = rb.build(spec, spec.init_weights(0))
    trainer, set_lr = make_trainer(cfg, rb, model)
    tokens = np.ones((2, 6), np.int32)
    before = rb.export(model)
    set_lr(0)
    trainer.step(tokens, np.ones_like(tokens), tokens, np.zeros(tokens.shape, np.float32), num_steps=2,
                 num_grad_steps=2)
    after = rb.export(model)
    for k in before:
        np.testing.assert_allclose(after[k], before[k] * (1 - 1e-2 * 0.5), rtol=1e-5, atol=1e-8)
