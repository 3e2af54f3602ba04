"""How many recurrent iterations each training step runs, and how many carry gradient.

Huginn samples the depth per optimizer step: tau ~ LogNormal(log(mean) - sigma^2 / 2, sigma),
r = Poisson(tau) + 1 (so E[r] = mean + 1), then truncates backprop to the last k iterations.
The draw is a pure function of (seed, step), so every data-parallel rank and both backends
get the same r without communicating. Compiled backends want few distinct shapes: "bucketed"
rounds r up to the next bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MODES = ("poisson-lognormal", "fixed", "bucketed")


class ScheduleError(ValueError):
    """A depth schedule that cannot work, with what was wrong and how to fix it."""


@dataclass(frozen=True)
class DepthDraw:
    """One step's depth: ``num_steps = n_no_grad + n_grad``."""

    num_steps: int
    n_no_grad: int
    n_grad: int


@dataclass(frozen=True)
class DepthSchedule:
    """``mean_recurrence`` (Huginn: 32), ``backprop_depth`` k (Huginn: 8), ``sigma`` of the log-normal.

    ``mode="fixed"`` always runs ``mean_recurrence`` iterations; ``"bucketed"`` draws like
    ``"poisson-lognormal"`` then rounds up to the smallest of ``buckets`` >= r (the largest
    bucket caps it).
    """

    mean_recurrence: int = 32
    backprop_depth: int = 8
    mode: str = "poisson-lognormal"
    sigma: float = 0.5
    buckets: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ScheduleError(f"Unknown depth schedule mode {self.mode!r}; choose one of {', '.join(MODES)}.")
        if not self.mean_recurrence >= 1:
            raise ScheduleError(f"mean_recurrence must be >= 1, got {self.mean_recurrence}.")
        if int(self.backprop_depth) < 1:
            raise ScheduleError(
                f"backprop_depth k must be >= 1, got {self.backprop_depth}: with k = 0 no iteration carries "
                "gradient and the core block never learns."
            )
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ScheduleError(f"sigma must be a finite number >= 0, got {self.sigma}.")
        if self.mode == "bucketed":
            if not self.buckets or any(int(b) < 1 for b in self.buckets):
                raise ScheduleError("mode='bucketed' needs buckets, a list of depths >= 1, e.g. [4, 8, 16, 32, 64].")
            object.__setattr__(self, "buckets", tuple(sorted(int(b) for b in self.buckets)))

    def sample_depth(self, step: int) -> int:
        """r for optimizer step ``step``: identical on every rank and backend for the same seed."""
        if self.mode == "fixed":
            return int(self.mean_recurrence)
        rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, int(step)])
        mu = math.log(self.mean_recurrence) - self.sigma**2 / 2
        r = int(rng.poisson(rng.lognormal(mu, self.sigma))) + 1
        if self.mode == "bucketed":
            r = next((b for b in self.buckets if b >= r), self.buckets[-1])
        return r

    def sample(self, step: int) -> DepthDraw:
        """The step's (r, no-grad iterations max(r - k, 0), grad iterations min(r, k))."""
        r = self.sample_depth(step)
        k = int(self.backprop_depth)
        return DepthDraw(num_steps=r, n_no_grad=max(r - k, 0), n_grad=min(r, k))


def from_spec(spec: object, mode: str = "poisson-lognormal", seed: int = 0, **kw: object) -> DepthSchedule:
    """The schedule a recurrent spec was trained with (its mean recurrence and backprop depth)."""
    return DepthSchedule(mean_recurrence=int(spec.mean_recurrence), backprop_depth=int(spec.mean_backprop_depth),
                         mode=mode, seed=seed, **kw)
