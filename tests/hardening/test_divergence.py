"""One divergence policy on both backends (issue 13 item 4): a non-finite loss or gradient skips the step with
weights and optimizer state untouched, every skip is reported, and ``max_consecutive_skips`` skips in a row stop
the run with exit 1; NaN settings are refused before anything runs; a non-finite checkpoint is never saved.
The oracle for "untouched" is the checkpoint of the last applied step."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from diptych.cli import main
from diptych.core import checkpointing as ckpt
from diptych.core.optim import OptimConfig
from diptych.core.spec import tiny_spec
from diptych.core.tokenizer import CharTokenizer
from diptych.core.trainers.api import SFTTrainer
from diptych.core.trainers.base import DivergenceError, TrainerError
from diptych.core.trainers.runner import CheckpointConfig
from diptych.core.trainers.sft import SFTConfig

SFT_TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
            "data.task_knobs.digits=1", "data.n_train=16", "data.n_test=4", "sft.batch_size=4",
            "sft.max_prompt_length=6", "sft.max_completion_length=4"]
ROWS = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(8)]


@pytest.mark.slow  # ~35 s on JAX (three Orbax saves and restores)
def test_lr_1e10_skips_then_stops_with_exit_1_and_weights_untouched(backend, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "sft", "--backend", backend.name, "--quiet", f"out={out}", *SFT_TINY, "sft.steps=5",
               "sft.optim.lr=1e10", "sft.max_consecutive_skips=3", "checkpoint.every=1", "checkpoint.keep_last=5"])
    err = capsys.readouterr().err
    assert rc == 1
    for step in (2, 3, 4):  # every skip is reported with its trainer step (not once for all)
        assert f"warning: step {step} skipped (non-finite loss" in err
    assert "step 5" not in err and "the run diverged: 3 steps in a row (through step 4)" in err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["skipped"] for r in rows] == [0, 1, 1, 1]
    assert math.isfinite(rows[0]["loss"]) and rows[1]["loss"] is None
    # step 1 applied a (finite, huge) update; the skipped steps 2 and 3 left weights and optimizer state as it
    # left them, and the run stopped at step 4 before saving
    paths = ckpt.list_checkpoints(out / "checkpoints")
    assert [p.name for p in paths] == ["step_00000001", "step_00000002", "step_00000003"]
    states = [backend.restore(p)[0] for p in paths]
    weights = [backend.export_weights(s) for s in states]
    for w in weights[1:]:
        assert all(np.array_equal(weights[0][k], w[k]) for k in weights[0])
    assert [int(s.step) for s in states] == [1, 1, 1]  # applied updates: the skips did not advance the optimizer
    assert all(np.all(np.isfinite(v)) for v in weights[0].values())


def test_nan_lr_is_refused_before_anything_runs(backend, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "sft", "--backend", backend.name, "--quiet", f"out={out}", *SFT_TINY,
                 "sft.optim.lr=nan"]) == 2
    err = capsys.readouterr().err
    assert "sft.optim.lr must be a finite number, got 'nan'" in err and err.count("\n") == 1
    assert not out.exists()
    spec = tiny_spec("llama", vocab_size=CharTokenizer().vocab_size, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=1)
    with pytest.raises(TrainerError, match=r"sft\.optim\.lr must be a finite number"):  # the library path too
        SFTTrainer(backend.build(spec, spec.init_weights(0)), args=SFTConfig(optim=OptimConfig(lr=float("nan"))),
                   train_dataset=ROWS, backend=backend, tokenizer=CharTokenizer())


def _nan_model_trainer(backend, tmp_path, every: int) -> SFTTrainer:
    tok = CharTokenizer()
    spec = tiny_spec("llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    w = spec.init_weights(0)
    w["lm_head.weight"][5, 0] = np.nan
    cfg = SFTConfig(steps=5, batch_size=4, max_prompt_length=6, max_completion_length=4, max_consecutive_skips=3,
                    optim=OptimConfig(lr=1e-3))
    return SFTTrainer(backend.build(spec, w), args=cfg, train_dataset=ROWS, backend=backend, tokenizer=tok,
                      out_dir=tmp_path / f"every{every}", checkpoint=CheckpointConfig(every=every, keep_last=5))


def test_nan_weights_stop_the_run_and_are_never_checkpointed(backend, tmp_path, capsys):
    """Before: JAX skipped every step, saved NaN checkpoints and exited 0; torch raised an input error."""
    t = _nan_model_trainer(backend, tmp_path, every=0)
    with pytest.raises(DivergenceError, match="3 steps in a row") as e:
        t.train()
    assert e.value.step == 3 and [h["skipped"] for h in t.history] == [1.0, 1.0, 1.0]
    assert t.state is not None and int(t.state.step) == 0
    assert not ckpt.list_checkpoints(t.checkpoint_root)
    assert capsys.readouterr().err.count(" skipped (non-finite loss") == 3

    t = _nan_model_trainer(backend, tmp_path, every=1)
    with pytest.raises(DivergenceError, match=r"refusing to save the step-1 checkpoint: parameter 'lm_head.weight'"):
        t.train()
    assert not ckpt.list_checkpoints(t.checkpoint_root)


def test_a_good_step_resets_the_count():
    from diptych.core.trainers.base import DivergenceGuard

    g = DivergenceGuard(2)
    bad, good = {"skipped": 1.0, "loss": float("nan"), "grad_norm": 1.0}, {"skipped": 0.0, "loss": 1.0}
    g.check(1, bad)
    g.check(2, good)
    g.check(3, bad)
    g.check(4, {"skipped": 1.0})  # skipped for another reason (every group filtered): not divergence
    assert g.consecutive == 0 and g.skipped == 2
    g.check(5, bad)
    with pytest.raises(DivergenceError, match="through step 6"):
        g.check(6, bad)


def test_grpo_lr_1e10_gives_the_same_outcome_on_both_backends(backend, tmp_path, capsys):
    """Before: torch aborted with "batch['old_logprobs'] is not finite" (its eager input check saw the detached
    NaN log-probs of the diverged model) while JAX skipped every step and ended "done" with exit 0."""
    from diptych.core.tasks import get_task
    from diptych.core.trainers.api import GRPOTrainer
    from diptych.core.trainers.grpo import GRPOConfig

    def variety(prompts, completions, **columns):
        return [len(set(c)) / (1 + len(c)) for c in completions]

    tok = CharTokenizer()
    spec = tiny_spec("llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    cfg = GRPOConfig(steps=5, prompts_per_step=2, num_generations=4, max_prompt_length=6, max_completion_length=4,
                     max_consecutive_skips=3, optim=OptimConfig(lr=1e10))
    rows = get_task("arithmetic", digits=1, ops=("+",)).generate("train", 16, 0)
    t = GRPOTrainer(backend.build(spec, spec.init_weights(0)), variety, args=cfg, train_dataset=rows,
                    backend=backend, tokenizer=tok, out_dir=tmp_path / "grpo")
    with pytest.raises(DivergenceError, match=r"through step 4"):
        t.train()
    assert [h["skipped"] for h in t.history] == [0.0, 1.0, 1.0, 1.0]
    assert int(t.state.step) == 1 and all(np.all(np.isfinite(v)) for v in backend.export_weights(t.state).values())
    assert capsys.readouterr().err.count(" skipped (non-finite loss") == 3


@pytest.mark.slow  # PPO compiles generate, values and two train steps on JAX
def test_ppo_lr_1e10_gives_the_same_outcome_on_both_backends(backend, capsys):
    """PPO's own forward passes (old log-probs, values) of a diverged policy are divergence, not bad input: before,
    torch raised "gae rewards or values contain NaN" while JAX went on."""
    from diptych.core.tasks import get_task
    from diptych.core.trainers.api import PPOTrainer
    from diptych.core.trainers.ppo import PPOConfig

    def variety(prompts, completions, **columns):
        return [len(set(c)) / (1 + len(c)) for c in completions]

    tok = CharTokenizer()
    spec = tiny_spec("llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    cfg = PPOConfig(steps=5, prompts_per_step=4, num_ppo_epochs=1, max_prompt_length=6, max_completion_length=4,
                    optim=OptimConfig(lr=1e10))
    rows = get_task("arithmetic", digits=1, ops=("+",)).generate("train", 16, 0)
    t = PPOTrainer(backend.build(spec, spec.init_weights(0)), variety, args=cfg, train_dataset=rows, backend=backend,
                   tokenizer=tok)
    with pytest.raises(DivergenceError, match=r"through step 4"):
        t.train()
    assert [h["skipped"] for h in t.history] == [0.0, 1.0, 1.0, 1.0] and int(t.state.step) == 1
    assert capsys.readouterr().err.count("skipped (non-finite old log-probs or values") == 3
