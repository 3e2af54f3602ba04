"""A weight swap mid-generation really happens with the continuous generator, and what the trainer receives is
right: every token's recorded version and behaviour log-prob are what the saved weights of that version give
(recomputed by a clean forward; the generator rewrites its KV cache at each swap, ``recompute_kv``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import needs_jax
from helpers import ROWS, SPEC, TOK, Recorder, config, fresh_state, train_recording_groups, variety

from diptych.asyncrl.orchestrator import AsyncGRPO, Phases
from diptych.core.backend import get_backend
from diptych.core.trainers import grpo
from diptych.core.trainers.base import sequence_logprobs


@pytest.mark.parametrize("name", ["torch", pytest.param("jax", marks=[pytest.mark.slow, needs_jax])])  # jax: 30-40 s
def test_rows_span_two_versions_and_their_versions_and_logprobs_are_right(name):
    backend = get_backend(name)
    # 8 decode steps of >= 0.2 s per group: the trainer's step (well under a second once compiled) lands inside
    cfg = dataclasses.replace(config(steps=5, enabled=True, max_staleness=2, generator="continuous",
                                     recompute_kv=True), max_completion_length=8)
    phases = Phases(sample=grpo.sample_rollout, score=grpo.score, advantages=grpo.advantage_batch,
                    train=grpo.train_on_batch)
    saved: dict[int, dict[str, np.ndarray]] = {}
    run = AsyncGRPO(backend, fresh_state(backend, cfg), TOK, variety, ROWS, cfg, phases, step_delay_s=0.2,
                    on_publish=lambda v, w: saved.__setitem__(v, {k: np.array(x) for k, x in w.items()}))
    rec = Recorder()
    trained = train_recording_groups(run, rec)

    mixed = [g for g in trained for r in range(len(g.arrays["mask"]))
             if len(np.unique(g.arrays["versions"][r][g.arrays["mask"][r] > 0])) > 1]
    assert mixed, "no completion spans two weight versions: the swap did not land mid-generation"
    models = {v: backend.build(SPEC, w) for v, w in saved.items()}
    for g in trained:
        a = g.arrays
        for v in np.unique(a["versions"][a["mask"] > 0]):
            on = (a["versions"] == v) & (a["mask"] > 0)
            lp = sequence_logprobs(backend, models[int(v)], a["tokens"], a["attention_mask"], on.astype(np.float32),
                                   cfg.temperature)
            np.testing.assert_allclose(a["sampler_logprobs"][on], lp[on], atol=2e-5)
    assert max(m["async/staleness_max"] for m in rec.rows.values()) <= 2
