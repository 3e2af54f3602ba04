"""PPO trainer: value warm-up trains only the critic; values are what the value head predicts;
a short run raises a dense reward; KL-in-reward is wired (k1) and bad settings are refused."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core.optim import OptimConfig
from diptych.core.spec import tiny_spec
from diptych.core.tokenizer import CharTokenizer
from diptych.core.trainers.base import TrainerError
from diptych.core.trainers.ppo import PPOConfig, ppo_step, train_ppo, values_of

ROWS = [{"prompt": f"{c}>"} for c in "bcdefghijk"]


def lowercase(prompts, completions, **columns):
    """Share of lowercase letters among 4 slots: dense (~20% for a random char model), so a few RL steps move it."""
    return [sum(ch.islower() for ch in c) / 4 for c in completions]


def setup(backend, **kw):
    tok = CharTokenizer()
    spec = tiny_spec("llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    cfg = PPOConfig(**{"steps": 12, "prompts_per_step": 4, "num_generations": 4, "num_ppo_epochs": 2,
                       "max_prompt_length": 3, "max_completion_length": 4, "kl_coef": 0.0, "seed": 1,
                       "optim": OptimConfig(lr=2e-2), **kw})
    state = backend.init_train_state(backend.build(spec, spec.init_weights(0)), cfg.optim, value_head=True)
    return tok, cfg, state


def test_value_warmup_trains_the_value_loss_alone(backend):
    tok, cfg, state = setup(backend, value_warmup_steps=1, num_ppo_epochs=1)
    probe = {"tokens": np.array([[0, 5, 6, 7, 8]], np.int32), "attention_mask": np.array([[0, 1, 1, 1, 1]], np.int32),
             "mask": np.ones((1, 4), np.float32)}
    v0 = values_of(backend, state, probe)
    state, m = ppo_step(backend, state, tok, lowercase, ROWS[:4], cfg, step=0)
    assert m["value_warmup"] == 1.0 and m["skipped"] == 0.0
    assert not any(k.startswith("policy/") for k in m) and "clipfrac" not in m  # no policy term in the loss
    assert not np.allclose(values_of(backend, state, probe), v0)  # the critic moved
    state, m = ppo_step(backend, state, tok, lowercase, ROWS[:4], cfg, step=1)
    assert m["value_warmup"] == 0.0 and "policy/clipfrac" in m


def test_values_of_matches_the_value_loss_inputs(backend):
    """values_of (the critic read-out used for GAE) equals old_values that give zero value loss when returns match."""
    *_, state = setup(backend)
    batch = {"tokens": np.array([[0, 5, 6, 7, 8], [4, 5, 9, 7, 3]], np.int32),
             "attention_mask": np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], np.int32),
             "mask": np.array([[0, 0, 1, 1], [0, 1, 1, 1]], np.float32)}
    v = values_of(backend, state, batch)
    assert v.shape == (2, 4) and (v[batch["mask"] == 0] == 0).all() and np.abs(v).max() > 0
    _, m = backend.train_step(state, [{**batch, "old_values": v, "returns": v}], "value",
                              PPOConfig().loss(warmup=True)[1])
    assert m["loss"] == pytest.approx(0.0, abs=1e-10)


def test_short_ppo_run_raises_a_dense_reward(backend):
    from diptych.core.metrics import MetricsLogger

    tok, cfg, state = setup(backend)
    log = MetricsLogger()
    train_ppo(backend, state, tok, lowercase, ROWS, cfg, log)
    rewards = [h["reward"] for h in log.history]
    for key in ("kl", "value_mean", "loss", "policy/clipfrac", "time/generate", "time/score", "time/train"):
        assert key in log.history[-1], key
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1, rewards


def test_kl_in_reward_needs_a_reference_and_bad_settings_are_refused(backend):
    tok, cfg, state = setup(backend, kl_coef=0.05)
    with pytest.raises(TrainerError, match="needs a reference model"):
        ppo_step(backend, state, tok, lowercase, ROWS[:4], cfg, step=0)
    with pytest.raises(TrainerError, match="micro_batches"):
        PPOConfig(prompts_per_step=3, num_generations=1, micro_batches=2)
    with pytest.raises(TrainerError, match="kl_estimator"):
        PPOConfig(kl_estimator="k4")
