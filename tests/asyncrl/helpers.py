"""A tiny GRPO setup shared by the async tests (the resume test's: one-layer llama, char tokenizer)."""

from __future__ import annotations

import dataclasses

import numpy as np

from diptych.asyncrl.config import AsyncConfig
from diptych.core.optim import OptimConfig
from diptych.core.spec import tiny_spec
from diptych.core.tasks import get_task
from diptych.core.tokenizer import CharTokenizer
from diptych.core.trainers.grpo import GRPOConfig, train_grpo


def variety(prompts, completions, **columns):
    """A dense reward (distinct characters per character), so a random model gets non-zero advantages."""
    return [len(set(c)) / (1 + len(c)) for c in completions]


class Recorder:
    def __init__(self):
        self.rows: dict[int, dict[str, float]] = {}

    def log(self, step, metrics):
        self.rows[step] = dict(metrics)


TOK = CharTokenizer()
ROWS = get_task("arithmetic", digits=1, ops=("+",)).generate("train", 64, 0)
SPEC = tiny_spec("llama", vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1)


def config(steps: int = 3, **async_kw) -> GRPOConfig:
    return GRPOConfig(steps=steps, prompts_per_step=2, num_generations=4, max_prompt_length=6,
                      max_completion_length=4, seed=3, optim=OptimConfig(lr=1e-2),
                      async_=AsyncConfig(**async_kw) if async_kw else AsyncConfig())


def fresh_state(backend, cfg):
    return backend.init_train_state(backend.build(SPEC, SPEC.init_weights(0)), cfg.optim)


def run(backend, cfg, spy=None, **kw):
    """Train from the seed weights; returns (final canonical weights, logged metrics by step, train batches)."""
    rec, batches = Recorder(), []
    train_step = backend.train_step

    def spy_train_step(st, mbs, *a, **k):
        batches.append({key: np.concatenate([np.asarray(mb[key]) for mb in mbs]) for key in mbs[0]})
        return train_step(st, mbs, *a, **k)

    backend.train_step = spy_train_step
    try:
        state = train_grpo(backend, fresh_state(backend, cfg), TOK, variety, ROWS, cfg, rec, **kw)
    finally:
        del backend.train_step
    return backend.export_weights(state), rec.rows, batches


def with_async(cfg: GRPOConfig, **kw) -> GRPOConfig:
    return dataclasses.replace(cfg, async_=dataclasses.replace(cfg.async_, **kw))


def train_recording_groups(run, rec) -> list:
    """Run an ``AsyncGRPO`` to its end, logging to ``rec``; returns every group the trainer trained on."""
    trained, take = [], run._take_batch_for_step

    def spy():
        groups, m = take()
        trained.extend(groups)
        return groups, m

    run._take_batch_for_step = spy
    run.run(run.cfg.steps, lambda s, st, m: rec.log(s, m))
    return trained
