"""The bounded hand-offs between the roles: prompt slots (generator side) and scored groups (trainer side).

``Slots`` bounds how far the generator runs ahead: every group holds a slot from the moment its prompt is
handed to the generator until the trainer has trained on it (and published the new weights) or dropped it.
With ``(max_ahead + 1) * prompts_per_step`` slots, a generator never starts a prompt more than ``max_ahead``
optimizer steps before the step that trains it; with ``max_ahead = 0`` it waits for every update, which is
the synchronous loop. ``Scored`` holds groups the verifiers have finished, handed out lowest index first.
"""

from __future__ import annotations

import heapq
import threading
import time

from diptych.asyncrl.groups import Group


class Slots:
    """A counting gate taken ``n`` at a time (a step's prompts) and given back one group at a time."""

    def __init__(self, capacity: int) -> None:
        self.free = int(capacity)
        self._cond = threading.Condition()
        self.closed = False

    def take(self, n: int) -> tuple[bool, float]:
        """Wait until ``n`` slots are free and take them; returns (taken, seconds waited). False once closed."""
        t0 = time.perf_counter()
        with self._cond:
            while self.free < n and not self.closed:
                self._cond.wait(0.1)
            if self.closed:
                return False, time.perf_counter() - t0
            self.free -= n
            return True, time.perf_counter() - t0

    def give(self, n: int = 1) -> None:
        with self._cond:
            self.free += n
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class Scored:
    """Scored groups waiting for the trainer, lowest index first."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, Group]] = []
        self._cond = threading.Condition()

    def put(self, group: Group) -> None:
        with self._cond:
            heapq.heappush(self._heap, (group.index, group))
            self._cond.notify_all()

    def get(self, timeout: float) -> Group | None:
        """The lowest-index scored group, or None after ``timeout`` seconds."""
        with self._cond:
            if not self._heap:
                self._cond.wait(timeout)
            if not self._heap:
                return None
            return heapq.heappop(self._heap)[1]

    def __len__(self) -> int:
        with self._cond:
            return len(self._heap)
