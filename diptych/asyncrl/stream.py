"""What every generator role shares: the job and weight-poll protocol, and the loop of a generator that streams.

Kept apart from :mod:`diptych.asyncrl.roles` (which builds every generator kind, the vLLM one included) so the
vLLM generator can subclass the streaming loop without an import cycle.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from diptych.asyncrl.groups import GeneratedBatch, group_from_finished

WeightPoll = Callable[[int], "tuple[int, Mapping[str, np.ndarray]] | None"]
"""``poll(current_version) -> (version, weights)`` when newer weights exist, else None."""

STOP = None
"""The job that ends a generator loop."""


@dataclass
class Job:
    """One step's prompts; group ``i`` of it has index ``first_index + i``."""

    step: int
    rows: list[dict[str, Any]]
    first_index: int


class Source(Protocol):
    def get(self, timeout: float | None = None) -> Job | None: ...


class Sink(Protocol):
    def put(self, item: Any) -> None: ...


class StreamingGenerator:
    """The loop of a generator that streams (rows enter and leave one decode or engine step at a time): new
    prompts join the rows in flight as soon as a job comes, a group leaves as soon as its last completion ends,
    and new weights are taken between two steps without restarting the rows in flight. Subclasses say how to
    start on weights (:meth:`update_weights`), whether rows are in flight, how a job's rows go in and what one
    step finishes."""

    step_delay_s = 0.0
    version = -1

    def update_weights(self, weights: Mapping[str, np.ndarray], version: int) -> None:
        raise NotImplementedError

    def _ready(self) -> bool:
        """Weights taken: the first are published before any job."""
        return self.version >= 0

    def _inflight(self) -> bool:
        raise NotImplementedError

    def _submit(self, job: Job, ids: list[list[int]]) -> None:
        raise NotImplementedError

    def _finished(self) -> Iterator[tuple[int, int, Any]]:
        """One step; ``(group index, completion j, finished row)`` for each row it ended."""
        raise NotImplementedError

    def _take(self, poll: WeightPoll) -> bool:
        newer = poll(self.version)
        if newer is not None:
            self.update_weights(newer[1], newer[0])
        return newer is not None

    def run(self, source: Source, sink: Sink, poll: WeightPoll, should_stop: Callable[[], bool]) -> None:
        from diptych.core.trainers.base import encode_prompts

        g, cfg = self.cfg.num_generations, self.cfg
        pad = int(self.tokenizer.pad_id)
        open_groups: dict[int, tuple[Job, int, dict[int, Any]]] = {}  # index -> (job, position, finished by j)
        idle, busy, done = 0.0, 0.0, []
        while not should_stop():
            t0 = time.perf_counter()
            self._take(poll)
            inflight = self._ready() and self._inflight()
            try:
                job = source.get(timeout=0.0 if inflight else 0.1)
            except queue.Empty:
                job = -1  # nothing new
            if job is STOP:
                return
            if isinstance(job, Job):
                # Weights published before this job was handed over go in first (the trainer publishes before it
                # frees the slots): else at max_staleness 0 every job after the first started stale and was dropped.
                self._take(poll)
                while not self._ready():  # the first weights are published before any job; wait for them
                    if not self._take(poll):
                        if should_stop():
                            return
                        time.sleep(0.01)
                ids = encode_prompts(self.tokenizer, [r["prompt"] for r in job.rows], cfg.max_prompt_length)
                for i in range(len(ids)):
                    open_groups[job.first_index + i] = (job, i, {})
                self._submit(job, ids)
                inflight = True
            if not inflight:
                idle += time.perf_counter() - t0
                continue
            t1 = time.perf_counter()
            for index, j, f in self._finished():
                open_groups[index][2][j] = f
                if len(open_groups[index][2]) == g:
                    job_, i, fin = open_groups.pop(index)
                    done.append(group_from_finished([fin[k] for k in range(g)], job_.rows[i], index, job_.step,
                                                    cfg.max_prompt_length, cfg.max_completion_length, pad))
            if self.step_delay_s:
                time.sleep(self.step_delay_s)  # a scripted slow generator (tests): weights land mid-generation
            busy += time.perf_counter() - t1
            if done:
                sink.put(GeneratedBatch(done, busy_s=busy, idle_s=idle))
                idle, busy, done = 0.0, 0.0, []
