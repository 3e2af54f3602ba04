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


@pytest.mark.slow
def test_diptych_train_joins_a_multihost_job_from_the_environment(tmp_path):
    """``diptych train --backend jax`` on two processes described by DIPTYCH_* variables is one job over 4 devices:
    one metrics writer, and the losses of the one-process run."""
    import json
    from pathlib import Path

    diptych = str(Path(sys.executable).parent / "diptych")
    tiny = ["train", "sft", "--backend", "jax", "--quiet", "model.hidden_size=32", "model.intermediate_size=64",
            "model.num_hidden_layers=1", "data.n_train=16", "data.n_test=4", "sft.batch_size=4", "sft.steps=2"]
    port, procs = free_port(), []
    for i in range(2):
        env = worker_env()
        env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", DIPTYCH_COORDINATOR=f"127.0.0.1:{port}",
                   DIPTYCH_NUM_PROCESSES="2", DIPTYCH_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([diptych, *tiny, "--mesh", "fsdp=4", f"out={tmp_path / 'mh'}"], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    single = subprocess.run([diptych, *tiny, f"out={tmp_path / 'one'}"], cwd=ROOT, env=worker_env(),
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    def losses(out):
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]  # one writer
        return [r["loss"] for r in rows]

    np.testing.assert_allclose(losses(tmp_path / "mh"), losses(tmp_path / "one"), rtol=1e-4)
