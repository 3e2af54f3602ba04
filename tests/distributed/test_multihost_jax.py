"""Multi-host JAX on one machine: two processes with 2 simulated CPU devices each join one job
(``DIPTYCH_COORDINATOR`` / ``DIPTYCH_NUM_PROCESSES`` / ``DIPTYCH_PROCESS_ID`` -> ``jax.distributed.initialize``,
gloo collectives), lay the same ``MeshConfig`` over the 4 global devices, and 3 SFT steps equal the one-device run.
A half-described job is refused in one line before JAX starts."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from diptych.core.mesh import MeshError
from tests.distributed import cases
from tests.distributed.conftest import HERE, ROOT, free_port, load, worker_env
from tests.train.helpers import needs_jax

pytestmark = needs_jax


@pytest.mark.slow
def test_two_jax_processes_train_like_one_device(tmp_path):
    out, port = tmp_path / "mh.npz", free_port()
    procs = []
    for i in range(2):
        env = worker_env()
        env.update(DIPTYCH_COORDINATOR=f"127.0.0.1:{port}", DIPTYCH_NUM_PROCESSES="2", DIPTYCH_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, str(HERE / "jax_multihost_worker.py"), str(out), "fsdp=4", "3"],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    r = load(out)
    # 2 processes, 4 global devices, 2 local; the core's env-neutral helper agrees with jax.process_index
    np.testing.assert_array_equal(r["layout"], [2, 4, 2, 0, 2])
    assert r["local_bytes"].shape == (2,) and r["local_bytes"].max() <= 1.05 * r["total"][0] / 4
    assert np.max(np.abs(r["loss"] - r["ref_loss"]) / r["ref_loss"]) <= cases.TOL
    got = {k[2:]: v for k, v in r.items() if k.startswith("w/")}
    want = {k[4:]: v for k, v in r.items() if k.startswith("ref/")}
    assert set(got) == set(want) and got
    assert cases.rel_err(got, want) <= cases.TOL
    assert cases.rel_err(want, cases.spec().init_weights(0)) > 100 * cases.TOL  # it trained


def test_the_job_comes_from_diptych_or_jax_variables():
    from diptych.backends.jax import sharding as S

    assert S.job_from_env({}) is None
    assert S.job_from_env({"DIPTYCH_COORDINATOR": "h:1", "DIPTYCH_NUM_PROCESSES": "2", "DIPTYCH_PROCESS_ID": "1"}) \
        == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
    assert S.job_from_env({"JAX_COORDINATOR_ADDRESS": "h:2", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}) \
        == {"coordinator_address": "h:2", "num_processes": 4, "process_id": 3}
    assert S.job_from_env({"SLURM_JOB_ID": "7"}) == {}  # JAX detects SLURM / Cloud TPU itself


@pytest.mark.parametrize(("env", "message"), [
    ({"DIPTYCH_COORDINATOR": "h:1", "DIPTYCH_PROCESS_ID": "0"}, "DIPTYCH_NUM_PROCESSES missing"),
    ({"DIPTYCH_NUM_PROCESSES": "2"}, "DIPTYCH_COORDINATOR, DIPTYCH_PROCESS_ID missing"),
    ({"DIPTYCH_COORDINATOR": "h:1", "DIPTYCH_NUM_PROCESSES": "2", "DIPTYCH_PROCESS_ID": "2"},
     r"=2 must be in 0\.\.DIPTYCH_NUM_PROCESSES-1 = 1"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "must be integers"),
])
def test_a_half_described_job_is_refused_before_jax_starts(env, message):
    from diptych.backends.jax import sharding as S

    with pytest.raises(MeshError, match=message):
        S.initialize(env)
