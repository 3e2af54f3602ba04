"""``diptych train grpo ... async.enabled=true async.max_staleness=2`` and the Python API run the asynchronous
loop (its metrics are in metrics.jsonl), with the off-policy correction in the loss."""

from __future__ import annotations

import json

import pytest
from conftest import needs_torch
from helpers import ROWS, SPEC, TOK, variety

from diptych.asyncrl.config import AsyncConfig
from diptych.cli import main
from diptych.core.optim import OptimConfig
from diptych.core.trainers.api import GRPOTrainer
from diptych.core.trainers.grpo import GRPOConfig

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
        "data.task_knobs.digits=1", "data.n_train=64", "data.n_test=8", "grpo.prompts_per_step=2",
        "grpo.num_generations=4", "grpo.max_prompt_length=6", "grpo.max_completion_length=4"]
ASYNC_KEYS = ("async/staleness_mean", "async/staleness_max", "async/groups_dropped", "async/generator_idle_s",
              "async/trainer_idle_s", "async/generator_tokens_per_s", "async/trainer_tokens_per_s")


@needs_torch
def test_cli_async_run_logs_both_roles_throughput_and_the_correction(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "grpo", "--backend", "torch", "--quiet", f"out={out}", "grpo.steps=3", *TINY,
                 "grpo.async.enabled=true", "grpo.async.max_staleness=2", "grpo.async.correction=tis"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in (*ASYNC_KEYS, "async/correction_clipfrac", "offpolicy_weight", "reward", "loss"):
        assert key in rows[-1], key
    assert all(r["async/staleness_max"] <= 2 for r in rows)
    assert rows[-1]["async/generator_tokens_per_s"] > 0 and rows[-1]["async/trainer_tokens_per_s"] > 0


@needs_torch
@pytest.mark.parametrize(("correction", "iterations"), [("none", 1), ("decoupled", 1), ("tis", 2)])
def test_python_api_async_run(correction, iterations):
    """With two passes the proximal log-probs come from a forward of the trainer's weights (old_logprobs)."""
    args = GRPOConfig(steps=2, prompts_per_step=2, num_generations=4, max_prompt_length=6, max_completion_length=4,
                      optim=OptimConfig(lr=1e-2), num_iterations=iterations,
                      async_=AsyncConfig(enabled=True, max_staleness=1, correction=correction))
    from diptych.core.backend import get_backend

    backend = get_backend("torch")
    trainer = GRPOTrainer(backend.build(SPEC, SPEC.init_weights(0)), reward_funcs=variety, args=args,
                          train_dataset=ROWS, backend=backend, tokenizer=TOK)
    trainer.train()
    assert len(trainer.history) == 2
    last = trainer.history[-1]
    assert all(k in last for k in ASYNC_KEYS)
    assert ("async/correction_clipfrac" in last) == (correction != "none")


def test_async_settings_the_loop_cannot_run_are_refused_with_the_config():
    with pytest.raises(ValueError, match="rollout: native"):
        GRPOConfig(rollout="vllm", async_=AsyncConfig(enabled=True))
    with pytest.raises(ValueError, match=r"async\.generator=batch or parity=false"):
        GRPOConfig(parity=True, async_=AsyncConfig(enabled=True, generator="continuous"))
    GRPOConfig(rollout="vllm", async_=AsyncConfig(enabled=False))  # off: nothing to refuse
