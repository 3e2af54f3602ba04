"""Where the generator runs on one host: a thread of the trainer's process, or a process of its own.

Both are driven the same way by the orchestrator (``submit`` a job, ``results`` back, ``publish`` new weights,
``alive``, ``restart``, ``close``) and run the same loop (``diptych.asyncrl.roles``). In a process, weights
cross through shared memory: one ``multiprocessing.shared_memory`` block holds the canonical float32 arrays
side by side (the layout is sent once, at start), a lock keeps a reader from seeing half a write, and a shared
counter says which version the block holds; no weight is ever pickled. The process can be pinned to its own
cores (``os.sched_setaffinity``).

A forked JAX or torch *runtime* is not safe, so the process is never forked from the trainer. On Linux it is
forked from a ``forkserver`` that has only *imported* the framework and diptych (no thread pool, no device
initialised), so a generator starts in milliseconds instead of re-importing torch or JAX (about two seconds
here); :func:`prestart` launches that server as soon as a run's config is read, so its imports overlap the run's
own set-up. Elsewhere it is started with ``spawn``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from diptych.asyncrl.roles import make_generator
from diptych.asyncrl.stream import STOP, Job

_PRELOAD = ("diptych.asyncrl.placement", "diptych.asyncrl.roles", "diptych.core.trainers.grpo")


def process_context(backend: str | None = None) -> Any:
    """The start method for generator processes: ``forkserver`` preloading ``backend``'s modules where the
    platform has it, else ``spawn``. The preload is set only before the server first starts (one per process)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    if backend is not None and not _forkserver_started():
        from diptych.core.backend import BackendError, backend_modules

        with contextlib.suppress(BackendError):  # an unknown backend: nothing of it to preload
            # "__main__" as by default (and as spawn does): objects of the user's script still unpickle there
            ctx.set_forkserver_preload(["__main__", *backend_modules(backend), *_PRELOAD])
    return ctx


def _forkserver_started() -> bool:
    from multiprocessing import forkserver

    return getattr(forkserver._forkserver, "_forkserver_pid", None) is not None


def prestart(cfg: Any, backend: str) -> None:
    """Start the fork server now when ``cfg`` (a GRPO config) will run a generator process: its imports then
    overlap the run's set-up (the trainer's own imports, data, model), and the generator starts at once later."""
    a = getattr(cfg, "async_", None)
    if a is None or not a.enabled or a.placement != "process":
        return
    ctx = process_context(backend)
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


class GeneratorDied(RuntimeError):
    """The generator stopped: its process exited or its loop raised. Says why and what to do."""


@dataclass
class Failure:
    """A generator loop's exception, carried to the trainer as text (it may not pickle)."""

    message: str


class LocalWeights:
    """Weights handed over by reference, for a generator in the trainer's own process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version, self._weights = -1, None

    def publish(self, weights: Mapping[str, np.ndarray], version: int) -> None:
        with self._lock:
            self._version, self._weights = int(version), dict(weights)

    def poll(self, current: int) -> tuple[int, Mapping[str, np.ndarray]] | None:
        with self._lock:
            if self._version <= current or self._weights is None:
                return None
            return self._version, self._weights


@dataclass
class SharedWeightsReader:
    """The generator process's end of :class:`SharedWeights` (picklable: names, shapes and the shared lock)."""

    name: str
    layout: list[tuple[str, tuple[int, ...], int]]
    lock: Any
    version: Any
    _shm: Any = None

    def poll(self, current: int) -> tuple[int, dict[str, np.ndarray]] | None:
        if self.version.value <= current:
            return None
        if self._shm is None:
            self._shm = shared_memory.SharedMemory(name=self.name)
        with self.lock:
            v = int(self.version.value)
            out = {n: np.ndarray(shape, np.float32, self._shm.buf, off).copy() for n, shape, off in self.layout}
        return v, out

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None


class SharedWeights:
    """The trainer's end: one shared block laid out from the first weights; ``publish`` copies into it."""

    def __init__(self, weights: Mapping[str, np.ndarray], ctx: Any) -> None:
        self.layout: list[tuple[str, tuple[int, ...], int]] = []
        off = 0
        for name in sorted(weights):
            shape = tuple(np.shape(weights[name]))
            self.layout.append((name, shape, off))
            off += int(np.prod(shape, dtype=np.int64)) * 4
        self.shm = shared_memory.SharedMemory(create=True, size=max(off, 4))
        self.lock = ctx.Lock()
        self.version = ctx.Value("q", -1, lock=False)

    def publish(self, weights: Mapping[str, np.ndarray], version: int) -> None:
        names = {n for n, _, _ in self.layout}
        if set(weights) != names:
            raise GeneratorDied(f"the weights to publish changed names ({len(weights)} arrays, the shared block holds "
                                f"{len(names)}); the model cannot change mid-run.")
        with self.lock:
            for name, shape, off in self.layout:
                np.ndarray(shape, np.float32, self.shm.buf, off)[...] = np.asarray(weights[name], np.float32)
            self.version.value = int(version)

    def reader(self) -> SharedWeightsReader:
        return SharedWeightsReader(self.shm.name, self.layout, self.lock, self.version)

    def close(self) -> None:
        self.shm.close()
        with contextlib.suppress(FileNotFoundError):
            self.shm.unlink()


@dataclass
class GeneratorSpec:
    """Everything a generator needs to start anywhere (picklable: the backend goes by name)."""

    backend: str
    spec: Any
    tokenizer: Any
    cfg: Any
    sample: Callable[..., Any]
    kind: str = "batch"
    slots: int | None = None
    recompute_kv: bool = False
    step_delay_s: float = 0.0

    def build(self, backend: Any = None) -> Any:
        from diptych.core.backend import get_backend

        return make_generator(self.kind, backend if backend is not None else get_backend(self.backend), self.spec,
                              self.tokenizer, self.cfg, self.sample, self.slots, self.recompute_kv, self.step_delay_s)


class _Loop:
    """Run a generator loop, turning its exception into a :class:`Failure` on the results queue."""

    @staticmethod
    def run(gen: Any, jobs: Any, out: Any, poll: Callable[[int], Any], should_stop: Callable[[], bool]) -> None:
        try:
            gen.run(jobs, out, poll, should_stop)
        except BaseException as e:
            out.put(Failure(f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))


class _Queued:
    """What both local placements share: weights published through ``self.weights``, jobs in, results out."""

    weights: Any
    jobs: Any
    out: Any

    def publish(self, weights: Mapping[str, np.ndarray], version: int) -> None:
        self.weights.publish(weights, version)

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def results(self, timeout: float) -> Any:
        return self.out.get(timeout=timeout)


class ThreadGenerator(_Queued):
    """The generator in a thread of the trainer's process (weights by reference); ``cores`` pins that thread."""

    placement = "thread"

    def __init__(self, gspec: GeneratorSpec, backend: Any, cores: tuple[int, ...] | None = None) -> None:
        self.gspec, self.backend, self.cores = gspec, backend, cores
        self.weights = LocalWeights()
        self._start()

    def _start(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.out: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        gen = self.gspec.build(self.backend)
        self.thread = threading.Thread(target=self._run, args=(gen,), daemon=True, name="diptych-gen")
        self.thread.start()

    def _run(self, gen: Any) -> None:
        if self.cores:
            os.sched_setaffinity(0, set(self.cores))  # on Linux, 0 is the calling thread: this one alone
        _Loop.run(gen, self.jobs, self.out, self.weights.poll, self._stop.is_set)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def death(self) -> str:
        return "the generator thread stopped"

    def restart(self) -> None:
        self.close()
        self._start()

    def close(self) -> str | None:
        """Stop the loop; says how it died if it had stopped on its own before."""
        died = None if self.thread.is_alive() else self.death()
        self._stop.set()
        self.jobs.put(STOP)
        self.thread.join(timeout=30)
        return died


def _process_main(gspec: GeneratorSpec, jobs: Any, out: Any, reader: SharedWeightsReader,
                  cores: tuple[int, ...] | None, ready: Any = None) -> None:
    """The generator process: pin it, then run the same loop as a thread would, reading shared weights.

    ``ready`` (an event) is set once the process can sample at once: its framework imported and its model built
    on the first published weights (a batch generator's; its loop then finds nothing newer to load)."""
    if cores:
        os.sched_setaffinity(0, set(cores))
        os.environ["OMP_NUM_THREADS"] = str(len(cores))  # read when the backend imports its framework
        torch = sys.modules.get("torch")
        if torch is not None:  # the fork server imported it already: the variable came too late
            torch.set_num_threads(len(cores))
    try:
        gen = gspec.build()
        if ready is not None:
            deadline = time.monotonic() + 600
            while (newer := reader.poll(-1)) is None and time.monotonic() < deadline:
                time.sleep(0.01)  # the trainer publishes right after the start
            if newer is not None:
                gen.update_weights(newer[1], newer[0])
            ready.set()
    except BaseException as e:
        out.put(Failure(f"{type(e).__name__}: {e}"))
        return
    _Loop.run(gen, jobs, out, reader.poll, lambda: False)
    reader.close()


class ProcessGenerator(_Queued):
    """The generator in its own process (``spawn``), weights through shared memory, optionally pinned."""

    placement = "process"

    def __init__(self, gspec: GeneratorSpec, weights: Mapping[str, np.ndarray], cores: tuple[int, ...] | None = None
                 ) -> None:
        self.gspec, self.cores = gspec, cores
        self.ctx = process_context(gspec.backend)
        self.weights = SharedWeights(weights, self.ctx)
        self.proc: Any = None
        self._start()

    def _start(self) -> None:
        self.jobs = self.ctx.Queue()
        self.out = self.ctx.Queue()
        self._ready = self.ctx.Event() if self.gspec.kind == "batch" else None
        self.proc = self.ctx.Process(target=_process_main, name="diptych-generator", daemon=True,
                                     args=(self.gspec, self.jobs, self.out, self.weights.reader(), self.cores,
                                           self._ready))
        self.proc.start()

    def ready(self) -> bool:
        """Whether the process has started up (imports, model built) and samples a job at once."""
        return self._ready is None or self._ready.is_set()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def death(self) -> str:
        code = self.proc.exitcode if self.proc is not None else None
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        return f"the generator process (pid {self.pid}) {how}"

    def restart(self) -> None:
        self._stop_process()
        self._start()

    def _stop_process(self) -> str | None:
        """Stop the process (STOP, then terminate if it does not exit); says how it died if it exited other than
        by that STOP: its exit code is the one sure sign, where ``is_alive`` can lag a kill by a moment."""
        if self.proc is None:
            return None
        stuck = False
        if self.proc.is_alive() and not self.ready():  # still starting up (a warm start served every job): it
            stuck = True                               # holds no work, so do not wait for its imports to stop it
            self.proc.terminate()
            self.proc.join(timeout=5)
        if self.proc.is_alive():
            with contextlib.suppress(OSError, ValueError):
                self.jobs.put(STOP)
            deadline = time.monotonic() + 10
            while self.proc.is_alive() and time.monotonic() < deadline:
                # drain results nobody will read: a process exits only once its queue has flushed into the pipe
                with contextlib.suppress(Exception):
                    while True:
                        self.out.get_nowait()
                self.proc.join(timeout=0.05)
            if self.proc.is_alive():
                stuck = True
                self.proc.terminate()
                self.proc.join(timeout=5)
        # 0: it took the STOP; -SIGTERM: this terminate; anything else (a kill, an error) it did on its own
        died = None if self.proc.exitcode in (0, -signal.SIGTERM if stuck else 0) else self.death()
        for q in (self.jobs, self.out):
            q.cancel_join_thread()
            q.close()
        self.proc = None
        return died

    def close(self) -> str | None:
        """Stop the generator and free the shared block; says how the process died if it died on its own."""
        try:
            return self._stop_process()
        finally:
            self.weights.close()


class WarmStartGenerator:
    """A generator process whose start-up (a new interpreter, the framework's import, the model) overlaps the
    first steps: until the process is ready, jobs go to a thread generator in the trainer's process, which
    samples them with the same call, seed and weights (the trainer would only wait meanwhile). Once the process
    is ready and the thread has handed back every job it took, the thread stops and the process serves alone.
    Batch generators only (one result per job); every other call is the process generator's."""

    placement = "process"

    def __init__(self, proc: ProcessGenerator, thread: ThreadGenerator) -> None:
        self.proc, self.thread = proc, thread
        self._lock = threading.Lock()
        self._outstanding = 0  # jobs the thread took and has not answered
        self.thread_jobs = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def publish(self, weights: Mapping[str, np.ndarray], version: int) -> None:
        self.proc.publish(weights, version)
        with self._lock:
            if self.thread is not None:
                self.thread.publish(weights, version)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.thread is not None and not self.proc.ready():
                self._outstanding += 1
                self.thread_jobs += 1
                self.thread.submit(job)
                return
        self.proc.submit(job)

    def results(self, timeout: float) -> Any:
        with self._lock:
            thread = self.thread
        if thread is not None:
            try:
                item = thread.out.get_nowait()
            except queue.Empty:
                item = None
            if item is not None:
                with self._lock:
                    self._outstanding -= 1
                return item
            self._retire_thread()
            timeout = min(timeout, 0.02)  # come back for the thread's results soon
        return self.proc.results(timeout=timeout)

    def _retire_thread(self) -> None:
        with self._lock:
            if self.thread is None or self._outstanding > 0 or not self.proc.ready():
                return
            thread, self.thread = self.thread, None
        thread.close()

    def alive(self) -> bool:
        return self.proc.alive()

    def death(self) -> str:
        return self.proc.death()

    def restart(self) -> None:
        with self._lock:
            thread, self.thread = self.thread, None  # the jobs it held are resubmitted with the others
        if thread is not None:
            thread.close()
        self.proc.restart()

    def close(self) -> str | None:
        with self._lock:
            thread, self.thread = self.thread, None
        if thread is not None:
            thread.close()
        return self.proc.close()
