"""Generator and trainer as Ray actors on a local CPU cluster: 5 steps equal the one-host multi-process run."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ROWS, TOK, Recorder, config, fresh_state, variety

from diptych.core.backend import get_backend
from diptych.core.trainers.grpo import train_grpo

ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_ray_generator_and_trainer_actors_match_the_multiprocess_run(monkeypatch):
    from diptych.asyncrl import ray_placement as rp

    calls = {"train": 0, "publish": 0}
    def counting(f, name):
        def counted(self, *a, **k):
            calls[name] += 1
            return f(self, *a, **k)
        return counted

    for cls, name in ((rp.RayTrainer, "train"), (rp.RayGenerator, "publish")):
        monkeypatch.setattr(cls, name, counting(getattr(cls, name), name))
    backend = get_backend("torch")
    out = {}
    for placement in ("process", "ray"):
        cfg = config(steps=5, enabled=True, max_staleness=0, placement=placement)
        rec = Recorder()
        state = train_grpo(backend, fresh_state(backend, cfg), TOK, variety, ROWS, cfg, rec)
        out[placement] = (backend.export_weights(state), rec.rows)
    try:
        (w_p, m_p), (w_r, m_r) = out["process"], out["ray"]
        assert [m_p[s]["reward"] for s in range(1, 6)] == [m_r[s]["reward"] for s in range(1, 6)]
        assert [m_p[s]["loss"] for s in range(1, 6)] == [m_r[s]["loss"] for s in range(1, 6)]
        for k in w_p:
            np.testing.assert_array_equal(w_p[k], w_r[k], err_msg=k)
        assert calls == {"train": 5, "publish": 6}  # the run really went through both actors
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_on_step_guard_and_saves_get_the_trainer_actors_live_state(tmp_path):
    """The state lives in the trainer actor, yet ``on_step``, the divergence guard and the checkpoint saves see
    the state of their step: the oracle is the synchronous run (max_staleness 0), step by step."""
    from diptych.core.trainers.base import DivergenceError, DivergenceGuard
    from diptych.core.trainers.runner import Checkpointer, SavePoints

    backend = get_backend("torch")
    sync: dict[int, dict] = {}
    cfg = config(steps=3)
    train_grpo(backend, fresh_state(backend, cfg), TOK, variety, ROWS, cfg, Recorder(),
               on_step=lambda s, st, m: sync.__setitem__(s, backend.export_weights(st)))

    class StopAt3(DivergenceGuard):
        def check(self, step, metrics, state=None):
            if step == 3:
                raise DivergenceError("stop", step=step, state=state)

    seen: dict[int, dict] = {}
    cfg = config(steps=3, enabled=True, max_staleness=0, placement="ray")
    ck = Checkpointer(backend, tmp_path, {"grpo": cfg}, every=2)
    try:
        with pytest.raises(DivergenceError) as e:
            train_grpo(backend, fresh_state(backend, cfg), TOK, variety, ROWS, cfg, Recorder(), guard=StopAt3(),
                       on_step=lambda s, st, m: seen.__setitem__(s, backend.export_weights(st)),
                       save=SavePoints(ck, [2], cfg.seed))
    finally:
        ray.shutdown()
    stopped = backend.export_weights(e.value.state)  # fetched from the actor only when the guard acted
    saved, meta = backend.restore(tmp_path / "step_00000002")
    assert sorted(seen) == [1, 2] and meta["step"] == 2
    for k in sync[1]:
        np.testing.assert_array_equal(seen[1][k], sync[1][k], err_msg=k)
        np.testing.assert_array_equal(seen[2][k], sync[2][k], err_msg=k)
        np.testing.assert_array_equal(backend.export_weights(saved)[k], sync[2][k], err_msg=k)
        np.testing.assert_array_equal(stopped[k], sync[3][k], err_msg=k)
    assert not np.array_equal(sync[1][k], sync[3][k])  # the steps really moved the weights
