"""A recurrent-depth train state checkpoints and restores like a decoder's (same weights, same next step)."""

from __future__ import annotations

import numpy as np

from diptych.core.optim import OptimConfig
from diptych.core.recurrent_spec import tiny_recurrent_spec


def _batch(spec, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, spec.vocab_size, (2, 6)).astype(np.int32)
    return {"tokens": tokens, "attention_mask": np.ones_like(tokens), "mask": np.ones((2, 5), np.float32)}


def test_recurrent_state_round_trips_through_a_checkpoint(backend, tmp_path):
    from diptych.core.losses import SFTLossConfig

    spec = tiny_recurrent_spec()
    state = backend.init_train_state(backend.build(spec, spec.init_weights(0)), OptimConfig(lr=1e-2))
    backend.set_depth(state.model, 2, 1)
    state, _ = backend.train_step(state, [_batch(spec)], "sft", SFTLossConfig())
    backend.save(state, tmp_path / "ckpt", metadata={"note": "r"})
    restored, meta = backend.restore(tmp_path / "ckpt")
    assert meta == {"note": "r"}
    saved, loaded = backend.export_weights(state), backend.export_weights(restored)
    assert set(saved) == set(spec.param_shapes())
    for name in saved:
        np.testing.assert_array_equal(saved[name], loaded[name], err_msg=name)
    backend.set_depth(restored.model, 2, 1)
    state, m1 = backend.train_step(state, [_batch(spec, 1)], "sft", SFTLossConfig())
    restored, m2 = backend.train_step(restored, [_batch(spec, 1)], "sft", SFTLossConfig())
    assert abs(m1["loss"] - m2["loss"]) <= 1e-6 * max(1.0, abs(m1["loss"]))
