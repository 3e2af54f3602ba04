"""Per-token adaptive exit: when a token's latent iteration has converged enough to stop.

Backend-neutral: each criterion sees numpy arrays of the last position (the output logits
``[B, V]`` and the latent state ``[B, H]``) after every iteration and answers which rows may
stop. Names and default thresholds follow Huginn's ``generate_with_adaptive_compute``: KL
between successive output distributions (5e-4), entropy difference (1e-3), relative latent
change (0.03), argmax stable for N iterations (5). A registry keeps them interchangeable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


class ExitError(ValueError):
    """An unknown exit criterion or an impossible threshold."""


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@dataclass
class ExitCriterion:
    """Stateful over one token's iterations: call ``reset(batch)``, then ``update`` after each one."""

    name: str
    threshold: float
    needs_logits: bool
    _fn: Callable[[ExitCriterion, np.ndarray | None, np.ndarray], np.ndarray] = field(repr=False)
    greater_exits: bool = False  # argmax-stability exits when the count reaches the threshold
    _prev: dict = field(default_factory=dict, repr=False)

    def reset(self, batch: int) -> None:
        self._prev = {"batch": batch}

    def update(self, logits: np.ndarray | None, latent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(value per row, rows whose value passes the threshold) after one more iteration."""
        values = np.asarray(self._fn(self, logits, np.asarray(latent, np.float64)), np.float64)
        passed = values >= self.threshold if self.greater_exits else values < self.threshold
        return values, passed


def _kl(c: ExitCriterion, logits, latent):
    lp = _log_softmax(logits)
    prev = c._prev.get("lp")
    if prev is None:  # Huginn compares the first iteration against the uniform distribution
        prev = np.full_like(lp, -np.log(lp.shape[-1]))
    c._prev["lp"] = lp
    return (np.exp(prev) * (prev - lp)).sum(-1)


def _entropy_diff(c: ExitCriterion, logits, latent):
    lp = _log_softmax(logits)
    ent = -(np.exp(lp) * lp).sum(-1)
    prev = c._prev.get("ent", np.full(ent.shape, 100.0))
    c._prev["ent"] = ent
    return np.abs(ent - prev)


def _latent_diff(c: ExitCriterion, logits, latent):
    prev = c._prev.get("x")
    c._prev["x"] = latent
    if prev is None:
        return np.full(latent.shape[0], np.inf)
    return np.linalg.norm(prev - latent, axis=-1) / np.maximum(np.linalg.norm(latent, axis=-1), 1e-30)


def _argmax_stability(c: ExitCriterion, logits, latent):
    am = np.argmax(logits, -1)
    prev = c._prev.get("am", np.full(am.shape, -1))
    count = c._prev.get("n", np.zeros(am.shape, np.int64))
    count = np.where(am == prev, count + 1, 0)
    c._prev["am"], c._prev["n"] = am, count
    return count


def _never(c: ExitCriterion, logits, latent):
    return np.full(latent.shape[0], np.inf)


# name -> (function, default threshold, needs logits, exits when value >= threshold)
CRITERIA: dict[str, tuple[Callable, float, bool, bool]] = {
    "kl": (_kl, 5e-4, True, False),
    "entropy-diff": (_entropy_diff, 1e-3, True, False),
    "latent-diff": (_latent_diff, 0.03, False, False),
    "argmax-stability": (_argmax_stability, 5, True, True),
    "none": (_never, 0.0, False, False),
}


def get_exit_criterion(name: str, threshold: float | None = None) -> ExitCriterion:
    """A fresh criterion by name (``kl``, ``entropy-diff``, ``latent-diff``, ``argmax-stability``, ``none``)."""
    if name not in CRITERIA:
        raise ExitError(f"Unknown exit criterion {name!r}; choose one of {', '.join(CRITERIA)}.")
    fn, default, needs_logits, greater = CRITERIA[name]
    thr = default if threshold is None else float(threshold)
    if not np.isfinite(thr) or thr < 0:
        raise ExitError(f"exit threshold for {name!r} must be a finite number >= 0, got {threshold}.")
    if name == "argmax-stability" and int(thr) < 1:
        raise ExitError(f"argmax-stability needs a count >= 1 of stable iterations, got {threshold}.")
    return ExitCriterion(name, thr, needs_logits, fn, greater)
