"""Generator and trainer as Ray actors (the ``ray`` extra): ``async.placement: ray``.

The driver keeps the orchestration (feeder, verifier pool, staleness bookkeeping); the generator actor runs
the same loop as a thread or a process would (``diptych.asyncrl.roles``) in a thread of its own, and the
trainer actor runs the GRPO loop's train phase on a state it owns. Weights go from the trainer actor to the
generator actor through Ray's object store (the trainer ``ray.put``s its canonical arrays and hands out the
reference; the driver passes the reference on and never holds the weights). On GPU clusters an NCCL
collective group would replace the object store; it is not written yet.

The train state enters and leaves the trainer actor as a checkpoint folder (``backend.save`` /
``backend.restore``), the one form every backend can rebuild exactly; on several hosts that folder must be on
a filesystem both can read.
"""

from __future__ import annotations

import contextlib
import queue
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from diptych.asyncrl.placement import GeneratorSpec, LocalWeights, _Loop
from diptych.asyncrl.stream import STOP, Job


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:  # pragma: no cover - the extra is installed in CI
        raise ImportError("async.placement=ray needs Ray: pip install 'diptych[ray]' (or placement=process).") from e
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


class RayWeights:
    """A handle on weights in the object store (what the trainer actor returns instead of the arrays)."""

    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def fetch(self) -> dict[str, np.ndarray]:
        return _ray().get(self.ref)


class GeneratorActor:
    """Runs the generator loop in a thread; its queues and weight slot are this actor's state."""

    def __init__(self, gspec: GeneratorSpec) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.out: queue.Queue = queue.Queue()
        self.weights = LocalWeights()
        self.stop = threading.Event()
        gen = gspec.build()
        self.thread = threading.Thread(target=_Loop.run, args=(gen, self.jobs, self.out, self.weights.poll,
                                                               self.stop.is_set), daemon=True)
        self.thread.start()

    def publish(self, weights: dict[str, np.ndarray], version: int) -> int:
        self.weights.publish({k: np.array(v) for k, v in weights.items()}, version)  # object-store arrays are read-only
        return version

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def results(self, timeout: float) -> Any:
        try:
            return self.out.get(timeout=timeout)
        except queue.Empty:
            return None

    def ping(self) -> bool:
        return self.thread.is_alive()

    def close(self) -> None:
        self.stop.set()
        self.jobs.put(STOP)
        self.thread.join(timeout=30)


class TrainerActor:
    """The trainer role on a state restored from a checkpoint folder."""

    def __init__(self, backend_name: str, path: str, cfg: Any, phases: Any, ref: tuple[Any, Any] | None,
                 loss: Any) -> None:
        from diptych.core.backend import get_backend

        self.backend = get_backend(backend_name)
        self.state, _ = self.backend.restore(path)
        self.cfg, self.phases, self.loss = cfg, phases, loss
        self.ref_model = self.backend.build(ref[0], ref[1]) if ref is not None else None

    def train(self, batch: dict[str, np.ndarray], step: int) -> tuple[dict[str, float], dict[str, float]]:
        from diptych.core.trainers.base import StepTimer

        timer = StepTimer()
        batch = {k: np.array(v) for k, v in batch.items()}
        self.state, metrics = self.phases.train(self.backend, self.state, batch, self.cfg, step, self.ref_model,
                                                timer, self.loss)
        return dict(metrics), dict(timer.seconds)

    def weights(self) -> list[Any]:
        import ray

        return [ray.put(self.backend.export_weights(self.state))]  # in a list: the caller gets the reference

    def save(self, path: str) -> str:
        self.backend.save(self.state, path)
        return path


class RayGenerator:
    """The driver's handle on the generator actor (the interface of the thread and process generators)."""

    placement = "ray"

    def __init__(self, gspec: GeneratorSpec) -> None:
        self.gspec = gspec
        self.ray = _ray()
        self._start()

    def _start(self) -> None:
        cls = self.ray.remote(num_cpus=1, max_concurrency=4)(GeneratorActor)
        self.actor = cls.remote(self.gspec)

    def publish(self, weights: Any, version: int) -> None:
        ref = weights.ref if isinstance(weights, RayWeights) else self.ray.put(dict(weights))
        self.ray.get(self.actor.publish.remote(ref, version))  # landed before the trainer frees any slot

    def submit(self, job: Job) -> None:
        self.actor.submit.remote(job)

    def results(self, timeout: float) -> Any:
        item = self.ray.get(self.actor.results.remote(timeout))
        if item is None:
            raise queue.Empty
        return item

    def alive(self) -> bool:
        try:
            return bool(self.ray.get(self.actor.ping.remote(), timeout=30))
        except Exception:  # an actor that died answers with RayActorError
            return False

    def death(self) -> str:
        return "the Ray generator actor died"

    def restart(self) -> None:
        self.ray.kill(self.actor)
        self._start()

    def close(self) -> str | None:
        """Stop the actor; says so if it had died (an actor that died answers ``close`` with RayActorError)."""
        died = None
        try:
            self.ray.get(self.actor.close.remote(), timeout=30)
        except Exception:
            died = self.death()
        with contextlib.suppress(Exception):
            self.ray.kill(self.actor)
        return died


class RayTrainer:
    """The driver's handle on the trainer actor; the state travels in and out as a checkpoint folder."""

    def __init__(self, backend: Any, state: Any, cfg: Any, phases: Any, ref_model: Any, loss: Any) -> None:
        self.backend, self.ray = backend, _ray()
        self._tmp = tempfile.TemporaryDirectory(prefix="diptych-ray-")
        path = backend.save(state, Path(self._tmp.name) / "start")
        ref = (ref_model.spec, backend.export(ref_model)) if ref_model is not None else None
        cls = self.ray.remote(num_cpus=1)(TrainerActor)
        self.actor = cls.remote(backend.name, str(path), cfg, phases, ref, loss)
        self._n = 0

    def train(self, batch: dict[str, np.ndarray], step: int, timer: Any) -> dict[str, float]:
        metrics, seconds = self.ray.get(self.actor.train.remote(batch, step))
        for k, v in seconds.items():
            timer.seconds[k] = timer.seconds.get(k, 0.0) + v
        return metrics

    def weights(self) -> RayWeights:
        return RayWeights(self.ray.get(self.actor.weights.remote())[0])

    @property
    def state(self) -> Any:
        self._n += 1
        path = self.ray.get(self.actor.save.remote(str(Path(self._tmp.name) / f"out_{self._n}")))
        return self.backend.restore(path)[0]

    def close(self) -> None:
        self.ray.kill(self.actor)
        self._tmp.cleanup()
