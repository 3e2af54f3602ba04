"""A generator process starts without re-importing its framework, and the warm start stays off the trainer's core.

The process is forked from a fork server that has imported torch (or JAX) and diptych, started as soon as a run's
config is read (``prestart``); until it is ready, the trainer's process samples the first jobs in a thread pinned
to the generator's cores, so training keeps its own core from the first step."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import SPEC, TOK, config

from diptych.asyncrl.placement import GeneratorSpec, ProcessGenerator, ThreadGenerator, process_context
from diptych.core.backend import backend_modules, get_backend
from diptych.core.trainers.grpo import sample_rollout

linux_only = pytest.mark.skipif("forkserver" not in __import__("multiprocessing").get_all_start_methods(),
                                reason="no fork server on this platform (spawn is used)")


def _gspec() -> GeneratorSpec:
    return GeneratorSpec(backend="torch", spec=SPEC, tokenizer=TOK, cfg=config(), sample=sample_rollout)


def test_the_warm_start_thread_runs_on_the_generator_cores():
    core = min(os.sched_getaffinity(0))
    gen = ThreadGenerator(_gspec(), get_backend("torch"), cores=(core,))
    try:
        deadline = time.monotonic() + 30
        while os.sched_getaffinity(gen.thread.native_id) != {core} and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.sched_getaffinity(gen.thread.native_id) == {core}
    finally:
        gen.close()
    if len(os.sched_getaffinity(0)) > 1:
        assert os.sched_getaffinity(0) != {core}  # the calling (trainer's) thread was not pinned with it


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@linux_only
def test_a_generator_process_is_forked_from_the_preloaded_server():
    ctx = process_context("torch")
    assert ctx.get_start_method() == "forkserver"
    w = SPEC.init_weights(0)
    gen = ProcessGenerator(_gspec(), w, cores=(min(os.sched_getaffinity(0)),))
    try:
        gen.publish(w, 0)
        deadline = time.monotonic() + 120
        while not gen.ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gen.ready() and gen.alive()
        assert _ppid(gen.pid) != os.getpid()  # its parent is the fork server, not this process
    finally:
        gen.close()


def test_backend_modules_name_the_framework_and_the_backend():
    mods = backend_modules("torch")
    assert mods[0] == "torch" and mods[-1].startswith("diptych.backends.torch")
    for m in mods:
        __import__(m)


@linux_only
@pytest.mark.parametrize("placement,started", [("process", True), ("thread", False)])
def test_prestart_starts_the_server_only_for_a_generator_process(placement, started):
    code = ("import multiprocessing.forkserver as fs\n"
            "from diptych.asyncrl.config import AsyncConfig\n"
            "from diptych.asyncrl.placement import prestart\n"
            "from diptych.core.trainers.grpo import GRPOConfig\n"
            f"prestart(GRPOConfig(async_=AsyncConfig(enabled=True, placement={placement!r})), 'torch')\n"
            "print(fs._forkserver._forkserver_pid is not None, sorted(fs._forkserver._preload_modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    up, _, preload = out.stdout.strip().partition(" ")
    assert up == str(started), out.stderr
    if started:
        assert "'torch'" in preload and "'diptych.asyncrl.placement'" in preload


def test_a_run_through_the_fork_server_equals_the_synchronous_run():
    # the whole chain (prestart, forked process, warm-start thread on the generator core) at max_staleness 0
    from helpers import run

    from diptych.asyncrl.placement import prestart

    backend = get_backend("torch")
    cfg = config(steps=3, enabled=True, max_staleness=0, placement="process",
                 generator_cores=(min(os.sched_getaffinity(0)),))
    prestart(cfg, "torch")
    w_sync, m_sync, _ = run(backend, config(steps=3))
    w_async, m_async, _ = run(backend, cfg)
    assert [m_sync[s]["reward"] for s in (1, 2, 3)] == [m_async[s]["reward"] for s in (1, 2, 3)]
    for k in w_sync:
        np.testing.assert_array_equal(w_sync[k], w_async[k], err_msg=k)
