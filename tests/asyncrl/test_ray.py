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
