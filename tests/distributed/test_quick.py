"""The fast proof that sharding runs: 2 JAX devices at fsdp=2, two SFT steps, equal to one device."""

from __future__ import annotations

import sys

import numpy as np

from tests.distributed import cases
from tests.distributed.conftest import HERE, load, run_worker, weights
from tests.train.helpers import needs_jax


@needs_jax
def test_two_jax_devices_train_like_one(tmp_path):
    out = tmp_path / "runs.npz"
    run_worker([sys.executable, str(HERE / "jax_worker.py"), str(out), "sft@one#2", "sft@fsdp=2#2"], timeout=600)
    r = load(out)
    assert np.max(np.abs(r["sft/fsdp=2/loss"] - r["sft/one/loss"]) / r["sft/one/loss"]) <= cases.TOL
    assert cases.rel_err(weights(r, "sft/fsdp=2"), weights(r, "sft/one")) <= cases.TOL
    assert r["sft/fsdp=2/bytes"].max() <= 1.05 * r["sft/fsdp=2/total"][0] / 2
    np.testing.assert_array_equal(r["sft/fsdp=2/gen"], r["sft/one/gen"])
