"""`diptych train`: example configs load, a tiny run writes metrics/plot/checkpoints and resumes,
and bad input (config typo, group size, micro-batch split, missing reward column, NaN loss) is
refused or reported clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_torch

from diptych.cli import main
from diptych.commands.train import RUN_CONFIGS
from diptych.core.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
        "data.task_knobs.digits=1", "data.n_train=64", "data.n_test=8"]
GRPO_TINY = [*TINY, "grpo.prompts_per_step=2", "grpo.num_generations=4", "grpo.max_prompt_length=6",
             "grpo.max_completion_length=4"]


@pytest.mark.parametrize("trainer", ["sft", "dpo", "grpo", "ppo"])
def test_example_configs_load(trainer):
    cfg = load_config(RUN_CONFIGS[trainer], ROOT / "configs" / f"{trainer}.yaml", [f"{trainer}.seed=7"])
    assert getattr(cfg, trainer).seed == 7 and cfg.data.task == "arithmetic"


def test_tiny_grpo_run_writes_metrics_plot_checkpoints_and_resumes(backend, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "grpo", "--backend", backend.name, "--quiet", f"out={out}", "grpo.steps=2",
            "checkpoint.every=1", "checkpoint.keep_last=2", *GRPO_TINY]
    assert main(args) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "completion_length", "time/generate", "time/score", "time/train", "tokens_per_s"):
        assert key in rows[0], key
    assert (out / "curves.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    meta = json.loads((out / "checkpoints" / "step_00000002" / "diptych.json").read_text())["metadata"]
    assert meta["step"] == 2 and meta["config"]["grpo"]["num_generations"] == 4 and "rng" in meta
    assert "accuracy_before" in capsys.readouterr().out
    # extend the same run by one step: it resumes at step 2 rather than starting over
    assert main([*args[:-len(GRPO_TINY) - 3], "--resume", f"out={out}", "grpo.steps=3", "checkpoint.every=1",
                 "checkpoint.keep_last=2", *GRPO_TINY]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]


def _fails(capsys, *argv: str) -> str:
    assert main(["train", *argv]) == 2
    return capsys.readouterr().err


@needs_torch
def test_config_typo_names_the_key_and_the_closest_valid_one(capsys):
    err = _fails(capsys, "grpo", "--backend", "torch", "grpo.bta=0.1")
    assert "Unknown config key 'grpo.bta'" in err and "Did you mean 'beta'" in err
    err = _fails(capsys, "dpo", "--backend", "torch", "dpo.optim.lrr=1e-3")
    assert "'dpo.optim.lrr'" in err and "Did you mean 'lr'" in err
    err = _fails(capsys, "sft", "--backend", "torch", "moddel.hidden_size=8")
    assert "Did you mean 'model'" in err


@needs_torch
def test_group_size_and_micro_batch_split_errors(capsys):
    assert "num_generations must be >= 2" in _fails(capsys, "grpo", "--backend", "torch", "grpo.num_generations=1")
    err = _fails(capsys, "grpo", "--backend", "torch", "grpo.prompts_per_step=3", "grpo.num_generations=3",
                 "grpo.micro_batches=2")
    assert "9 rollouts do not split into micro_batches=2" in err


@needs_torch
def test_dataset_without_the_rewards_column_is_refused(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1="}) + "\n" for i in range(4)))
    err = _fails(capsys, "grpo", "--backend", "torch", f"out={tmp_path}", f"data.path={data}", "data.task=arithmetic",
                 *GRPO_TINY[:3])
    assert "needs column(s) answer" in err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    assert "rejected" in _fails(capsys, "dpo", "--backend", "torch", f"data.path={pairs}")


def test_nan_loss_skips_the_step_reports_it_and_leaves_weights_untouched(backend):
    """A NaN loss (here: one corrupted lm_head weight) skips the update and says so; the run goes on."""
    from diptych.core.metrics import MetricsLogger
    from diptych.core.optim import OptimConfig
    from diptych.core.spec import tiny_spec
    from diptych.core.tokenizer import CharTokenizer
    from diptych.core.trainers.dpo import DPOConfig, ReferenceCache, train_dpo

    tok = CharTokenizer()
    spec = tiny_spec("llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    cfg = DPOConfig(steps=2, batch_size=2, max_prompt_length=3, max_completion_length=3, optim=OptimConfig(lr=1e-2))
    weights = spec.init_weights(0)
    weights["lm_head.weight"][7, 0] = np.nan
    state = backend.init_train_state(backend.build(spec, weights), cfg.optim)
    before = {k: v.copy() for k, v in backend.export(state.model).items()}
    rows = [{"prompt": "a:", "chosen": "a", "rejected": "b"}, {"prompt": "c:", "chosen": "c", "rejected": "d"}]
    cache = ReferenceCache(np.zeros((2, cfg.width - 1), np.float32), np.zeros((2, cfg.width - 1), np.float32))
    log = MetricsLogger()
    with pytest.warns(RuntimeWarning, match="Skipping optimizer step"):
        state = train_dpo(backend, state, tok, rows, cfg, log, ref_cache=cache)
    assert [h["skipped"] for h in log.history] == [1.0, 1.0] and not np.isfinite(log.history[0]["loss"])
    after = backend.export(state.model)
    assert all(np.array_equal(before[k], after[k], equal_nan=True) for k in before)
    assert state.step == 0


def test_nan_rewards_are_refused_with_a_clear_error(backend):
    from diptych.core.spec import tiny_spec
    from diptych.core.tokenizer import CharTokenizer
    from diptych.core.trainers.grpo import GRPOConfig, grpo_step

    tok = CharTokenizer()
    spec = tiny_spec("llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    cfg = GRPOConfig(prompts_per_step=2, num_generations=2, max_prompt_length=4, max_completion_length=3)
    state = backend.init_train_state(backend.build(spec, spec.init_weights(0)), cfg.optim)
    poisoned = lambda prompts, completions, **kw: [float("nan")] * len(completions)
    with pytest.raises(ValueError, match="rewards contain NaN"):
        grpo_step(backend, state, tok, poisoned, [{"prompt": "1+1="}, {"prompt": "2+2="}], cfg, step=0)


@needs_torch
def test_dpo_cli_caches_reference_logprobs_once_and_resume_reuses_them(tmp_path):
    out = tmp_path / "dpo"
    common = ["train", "dpo", "--backend", "torch", "--quiet", f"out={out}", "checkpoint.every=1", *TINY,
              "dpo.batch_size=4", "dpo.max_prompt_length=6", "dpo.max_completion_length=4"]
    assert main([*common, "dpo.steps=1"]) == 0
    cache = out / "checkpoints" / "ref_logprobs.npz"
    first = cache.stat().st_mtime_ns
    with np.load(cache) as f:
        assert f["chosen"].shape[1] == 6 + 4 - 1 and np.isfinite(f["chosen"]).all()
    assert main([*common, "--resume", "dpo.steps=2"]) == 0
    assert cache.stat().st_mtime_ns == first  # reused, not recomputed from the (trained) policy
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "rewards_accuracy" in rows[-1]


def test_short_grpo_run_raises_a_dense_reward(backend):
    """End to end on each backend: sample, score, group advantages, update; reward goes up."""
    from diptych.core.metrics import MetricsLogger
    from diptych.core.optim import OptimConfig
    from diptych.core.spec import tiny_spec
    from diptych.core.tokenizer import CharTokenizer
    from diptych.core.trainers.grpo import GRPOConfig, train_grpo

    tok = CharTokenizer()
    spec = tiny_spec("llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    cfg = GRPOConfig(steps=12, prompts_per_step=4, num_generations=4, max_prompt_length=3, max_completion_length=4,
                     seed=1, loss_type="grpo", beta=0.0, optim=OptimConfig(lr=2e-2))
    state = backend.init_train_state(backend.build(spec, spec.init_weights(0)), cfg.optim)
    lowercase = lambda prompts, completions, **kw: [sum(ch.islower() for ch in c) / 4 for c in completions]
    log = MetricsLogger()
    train_grpo(backend, state, tok, lowercase, [{"prompt": f"{c}>"} for c in "bcdefghijk"], cfg, log)
    rewards = [h["reward"] for h in log.history]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1, rewards


def test_trainer_fields_without_the_section_prefix_mean_the_trainers_section():
    """``diptych train grpo ... async.enabled=true lora.r=8`` (the issues' spelling) sets ``grpo.async_`` and
    ``grpo.lora``; run sections and unknown heads pass through untouched (an unknown key is still refused)."""
    from diptych.commands.train import trainer_overrides

    got = trainer_overrides("grpo", ["async.enabled=true", "lora.r=8", "steps=3", "model.hidden_size=32",
                                     "out=x", "nope.k=1"])
    assert got == ["grpo.async.enabled=true", "grpo.lora.r=8", "grpo.steps=3", "model.hidden_size=32", "out=x",
                   "nope.k=1"]
    cfg = load_config(RUN_CONFIGS["grpo"], None, trainer_overrides("grpo", ["async.enabled=true",
                                                                            "async.max_staleness=2", "lora.r=8"]))
    assert cfg.grpo.async_.enabled and cfg.grpo.async_.max_staleness == 2 and cfg.grpo.lora.r == 8
    assert trainer_overrides("sft", ["async.enabled=true"]) == ["async.enabled=true"]  # SFT has no async
