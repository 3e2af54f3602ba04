"""Kill a GRPO run between steps, resume from the latest checkpoint, and the next steps match an
uninterrupted run: same rewards, losses and final weights (the oracle is the uninterrupted run)."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core.optim import OptimConfig
from diptych.core.spec import tiny_spec
from diptych.core.tasks import get_task
from diptych.core.tokenizer import CharTokenizer
from diptych.core.trainers.base import TrainerError
from diptych.core.trainers.grpo import GRPOConfig, train_grpo
from diptych.core.trainers.runner import Checkpointer, run_segments, with_steps

STEPS = 4


class Killed(Exception):
    pass


class Recorder:
    """A MetricsLogger stand-in that records steps and can 'kill' the run after a given step."""

    def __init__(self, kill_after: int | None = None):
        self.rows: dict[int, dict[str, float]] = {}
        self.kill_after = kill_after

    def log(self, step, metrics):
        self.rows[step] = dict(metrics)
        if step == self.kill_after:
            raise Killed(step)


def variety(prompts, completions, **columns):
    """A dense reward (distinct characters per character), so a random model gets non-zero advantages."""
    return [len(set(c)) / (1 + len(c)) for c in completions]


def setup(backend):
    tok = CharTokenizer()
    task = variety
    rows = get_task("arithmetic", digits=1, ops=("+",)).generate("train", 64, 0)
    spec = tiny_spec("llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    cfg = GRPOConfig(steps=STEPS, prompts_per_step=2, num_generations=4, micro_batches=2, max_prompt_length=6,
                     max_completion_length=4, seed=3, optim=OptimConfig(lr=1e-2, warmup_steps=1, total_steps=STEPS,
                                                                 schedule="cosine"))
    def fresh_state():  # torch trains the model's own parameters in place: build one per run
        return backend.init_train_state(backend.build(spec, spec.init_weights(0)), cfg.optim)

    return tok, task, rows, cfg, fresh_state


def run(backend, state, tok, task, rows, cfg, ckpt, start, log):
    def loop(st, a, b):
        return train_grpo(backend, st, tok, task, rows, with_steps(cfg, b), log, start_step=a)

    return run_segments(loop, state, start, cfg.steps, ckpt, cfg.seed)


def test_killed_then_resumed_run_matches_uninterrupted(backend, tmp_path):
    tok, task, rows, cfg, fresh_state = setup(backend)
    full = Recorder()
    ref_state = run(backend, fresh_state(), tok, task, rows, cfg, None, 0, full)

    ckpt = Checkpointer(backend, tmp_path / "ckpt", {"grpo": cfg}, every=2, keep_last=1)
    killed = Recorder(kill_after=3)  # dies after step 3's update, before the step-4 checkpoint
    with pytest.raises(Killed):
        run(backend, fresh_state(), tok, task, rows, cfg, ckpt, 0, killed)
    assert [p.name for p in ckpt.root.iterdir() if p.name.startswith("step_")] == ["step_00000002"]

    resumed_ckpt = Checkpointer(backend, tmp_path / "ckpt", {"grpo": cfg}, every=2, keep_last=1)
    state, meta = resumed_ckpt.restore_latest()
    assert meta["step"] == 2 and meta["data_position"]["batch_index"] == 2 and meta["rng"]["seed"] == cfg.seed
    resumed = Recorder()
    state = run(backend, state, tok, task, rows, cfg, resumed_ckpt, meta["step"], resumed)

    assert sorted(resumed.rows) == [3, 4]
    for step in (3, 4):
        for key in ("reward", "completion_length", "loss", "grad_norm", "lr"):
            assert resumed.rows[step][key] == pytest.approx(full.rows[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert all(full.rows[s]["grad_norm"] > 0 for s in (3, 4))  # the compared steps really trained
    w_full, w_res = backend.export(ref_state.model), backend.export(state.model)
    for k in w_full:
        np.testing.assert_allclose(w_res[k], w_full[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert resumed_ckpt.latest().name == "step_00000004"


def test_resuming_with_a_different_config_is_refused(backend, tmp_path):
    *_, cfg, fresh_state = setup(backend)
    ckpt = Checkpointer(backend, tmp_path, {"grpo": cfg}, every=1)
    ckpt.save(1, fresh_state(), cfg.seed)
    other = GRPOConfig(**{**cfg.__dict__, "num_generations": 8})
    with pytest.raises(TrainerError, match="different config"):
        Checkpointer(backend, tmp_path, {"grpo": other}).restore_latest()
    longer = GRPOConfig(**{**cfg.__dict__, "steps": 10})  # extending a run is allowed
    assert Checkpointer(backend, tmp_path, {"grpo": longer}).restore_latest()[1]["step"] == 1


def test_save_points_cover_every_n_and_the_end():
    ckpt = Checkpointer(None, "unused", {}, every=2)
    assert ckpt.save_points(0, 5) == [2, 4, 5]
    assert ckpt.save_points(3, 6) == [4, 6]
    assert Checkpointer(None, "unused", {}, every=0).save_points(1, 3) == [3]
