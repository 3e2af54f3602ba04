"""The generator in its own process: weights through shared memory, pinned to its core, the same run as the
synchronous loop at max_staleness 0; killed mid-run it gives a clear error (or is restarted) and the last
checkpoint still loads."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading

import numpy as np
import pytest
from helpers import ROWS, SPEC, TOK, config, run, variety

from diptych.asyncrl.orchestrator import AsyncRLError
from diptych.asyncrl.placement import SharedWeights
from diptych.core.backend import get_backend
from diptych.core.trainers.api import GRPOTrainer
from diptych.core.trainers.runner import CheckpointConfig, Checkpointer


def _generators():
    return [p for p in mp.active_children() if p.name == "diptych-generator"]


def test_shared_weights_round_trip_without_pickle():
    w = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(4, np.float32)}
    board = SharedWeights(w, mp.get_context("spawn"))
    try:
        reader = board.reader()
        assert reader.poll(-1) is None  # nothing published yet
        board.publish(w, 0)
        v, got = reader.poll(-1)
        assert v == 0 and all(np.array_equal(got[k], w[k]) for k in w)
        assert reader.poll(0) is None  # nothing newer than what the reader holds
        board.publish({k: x * 2 for k, x in w.items()}, 1)
        v, got = reader.poll(0)
        assert v == 1 and np.array_equal(got["b"], w["b"] * 2)
        with pytest.raises(RuntimeError, match="changed names"):
            board.publish({"a": w["a"]}, 2)
        reader.close()
    finally:
        board.close()


def test_a_generator_process_pinned_to_its_core_gives_the_synchronous_run():
    backend = get_backend("torch")
    cores = (max(os.sched_getaffinity(0)),)
    seen: list[set[int]] = []

    def reward(prompts, completions, **kw):
        seen.extend(os.sched_getaffinity(p.pid) for p in _generators())
        return variety(prompts, completions)

    w_sync, m_sync, _ = run(backend, config(steps=3))
    # warm_start off: every step from the process (a warm start could do all 3)
    cfg = config(steps=3, enabled=True, max_staleness=0, placement="process", generator_cores=cores,
                 warm_start=False)
    from helpers import Recorder, fresh_state

    from diptych.core.trainers.grpo import train_grpo

    rec = Recorder()
    state = train_grpo(backend, fresh_state(backend, cfg), TOK, reward, ROWS, cfg, rec)
    w_async = backend.export_weights(state)
    assert seen and all(s == set(cores) for s in seen)
    assert rec.rows[3]["async/warm_start_jobs"] == 0
    assert [m_sync[s]["reward"] for s in (1, 2, 3)] == [rec.rows[s]["reward"] for s in (1, 2, 3)]
    for k in w_sync:
        np.testing.assert_array_equal(w_sync[k], w_async[k], err_msg=k)
    assert not _generators()  # the run stopped its generator


class KillAt:
    """A reward that kills the generator process at its ``n``-th call (the verifier runs in the trainer's process)
    and records the generator pids it saw (one pipeline for the whole run: one pid unless it was restarted)."""

    def __init__(self, n: int):
        self.n, self.calls, self.pids = n, 0, set()
        self.lock = threading.Lock()  # the verifier pool calls it from several threads

    def __call__(self, prompts, completions, **kw):
        with self.lock:  # count and compare at once (two verifiers could both pass n, and nothing be killed)
            self.calls += 1
            call = self.calls
        gens = _generators()
        self.pids.update(p.pid for p in gens)
        if call == self.n:
            for p in gens:
                os.kill(p.pid, signal.SIGKILL)
        return variety(prompts, completions)


def _trainer(tmp_path, cfg, reward, every=2):
    backend = get_backend("torch")
    return GRPOTrainer(backend.build(SPEC, SPEC.init_weights(0)), reward_funcs=reward, args=cfg, train_dataset=ROWS,
                       backend=backend, tokenizer=TOK, out_dir=tmp_path, checkpoint=CheckpointConfig(every=every,
                                                                                                  keep_last=3))


# 4 steps of 2 groups, one reward call per group: call 5 is the first group of step 3 (a save point, step 2, lies
# before it), call 7 the first group of the last step.
@pytest.mark.slow
@pytest.mark.parametrize("policy", ["fail", "restart"])
def test_a_killed_generator_fails_clearly_or_restarts_and_checkpoints_stay_intact(tmp_path, policy):
    cfg = config(steps=4, enabled=True, max_staleness=0, placement="process", on_generator_death=policy)
    backend = get_backend("torch")
    kill = KillAt(5)
    trainer = _trainer(tmp_path, cfg, kill)
    if policy == "fail":
        with pytest.raises(AsyncRLError, match=r"generator process \(pid \d+\) was killed by signal 9.*--resume"):
            trainer.train()
    else:
        out = trainer.train()
        assert out["steps"] == 4.0
        assert trainer.history[-1]["async/restarts"] == 1.0
    assert len(kill.pids) == (1 if policy == "fail" else 2)  # one generator start per run (plus the restart)
    restored = Checkpointer(backend, tmp_path / "checkpoints", {"grpo": cfg}).restore_latest()
    assert restored is not None
    state, meta = restored
    assert meta["step"] == (2 if policy == "fail" else 4)
    assert set(backend.export_weights(state)) == set(SPEC.init_weights(0))
    assert not _generators()
    if policy == "fail":  # resumed from step 2, one new pipeline runs steps 3-4: the uninterrupted sync run's weights
        resumed = GRPOTrainer(None, reward_funcs=variety, args=cfg, train_dataset=ROWS, backend=backend, tokenizer=TOK,
                              out_dir=tmp_path, checkpoint=CheckpointConfig(every=2, keep_last=3),
                              resume_from_checkpoint=True)
        resumed.train()
        want, _, _ = run(backend, config(steps=4))
        got = backend.export_weights(resumed.state)
        for k in want:
            np.testing.assert_array_equal(want[k], got[k], err_msg=k)


@pytest.mark.slow
def test_a_generator_killed_in_the_last_step_still_fails_and_leaves_the_previous_checkpoint(tmp_path):
    cfg = config(steps=4, enabled=True, max_staleness=0, placement="process", on_generator_death="fail")
    trainer = _trainer(tmp_path, cfg, KillAt(7))  # every group of the last step is already generated
    with pytest.raises(AsyncRLError, match=r"killed by signal 9 during the last step"):
        trainer.train()
    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert steps == ["step_00000002"]
    assert not _generators()


@pytest.mark.slow
def test_one_pipeline_saves_the_trainer_state_of_each_save_point(tmp_path):
    """Checkpoints written from inside the running pipeline hold the synchronous run's state at that step
    (max_staleness 0: the oracle is the synchronous loop), the generator started once, and its warm start (the
    first jobs sampled in the trainer's process) changes no draw."""
    backend = get_backend("torch")
    sync2, _, _ = run(backend, config(steps=2))
    sync4, _, _ = run(backend, config(steps=4))
    cfg = config(steps=4, enabled=True, max_staleness=0, placement="process")
    kill = KillAt(0)  # kills nothing, records the generator pids
    trainer = _trainer(tmp_path, cfg, kill)
    trainer.train()
    assert len(kill.pids) == 1
    # the first step(s) came from the warm start (the trainer's process sampled while the generator process
    # started), and the checkpoints still hold the synchronous run's weights
    assert trainer.history[-1]["async/warm_start_jobs"] >= 1
    ck = Checkpointer(backend, tmp_path / "checkpoints", {"grpo": cfg})
    for step, want in ((2, sync2), (4, sync4)):
        state, meta = backend.restore(tmp_path / "checkpoints" / f"step_{step:08d}")
        assert meta["step"] == step
        got = backend.export_weights(state)
        for k in want:
            np.testing.assert_array_equal(want[k], got[k], err_msg=f"step {step}: {k}")
    assert ck.latest().name == "step_00000004"
