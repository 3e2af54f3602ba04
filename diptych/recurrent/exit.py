"""Per-token adaptive exit: when a token's latent iteration has converged enough to stop.

Backend-neutral: after every iteration a criterion sees numpy arrays of the last position and
answers which rows may stop. Each criterion is registered with its contract
(:class:`ExitContract`): which per-iteration inputs it reads (``logits`` ``[B, V]``,
``log_probs`` (their float64 log-softmax), ``latent`` ``[B, H]``), its default threshold, the
smallest threshold that makes sense, and whether a row exits when its value falls below the
threshold or reaches it. The generation loop reads the contract to decide what to compute (no
readout for a latent-only criterion), so a new criterion is one :func:`register_exit_criterion`.

Names and default thresholds of the built-in ones follow Huginn's
``generate_with_adaptive_compute``: KL between successive output distributions (5e-4),
entropy difference (1e-3), relative latent change (0.03), argmax stable for N iterations (5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

INPUTS = ("logits", "log_probs", "latent")
"""What a criterion may ask for, per iteration, at the last position of every row."""

ExitFn = Callable[[dict[str, Any], dict[str, np.ndarray]], np.ndarray]
"""``(state, inputs) -> value per row``; ``state`` persists over one token's iterations (it holds
``batch`` after ``reset``), ``inputs`` holds exactly the contract's ``needs``."""


class ExitError(ValueError):
    """An unknown exit criterion, an impossible threshold, or a malformed registration."""


@dataclass(frozen=True)
class ExitContract:
    """What a registered criterion needs and promises; see the module docstring."""

    name: str
    fn: ExitFn = field(repr=False)
    default_threshold: float
    needs: tuple[str, ...]
    exits_when: Literal["below", "at_least"] = "below"
    min_threshold: float = 0.0
    threshold_means: str = ""

    def __post_init__(self) -> None:
        unknown = [n for n in self.needs if n not in INPUTS]
        if unknown:
            raise ExitError(f"exit criterion {self.name!r} needs unknown input(s) {unknown}; "
                            f"a criterion may need {', '.join(INPUTS)}.")
        if self.exits_when not in ("below", "at_least"):
            raise ExitError(f"exits_when must be 'below' or 'at_least', got {self.exits_when!r}.")
        check_threshold(self, self.default_threshold)


def check_threshold(contract: ExitContract, threshold: float) -> float:
    """The threshold as a float, or a one-line error naming the criterion's lower bound."""
    thr = float(threshold)
    if not np.isfinite(thr) or thr < 0:
        raise ExitError(f"exit threshold for {contract.name!r} must be a finite number >= 0, got {threshold}.")
    if thr < contract.min_threshold:
        means = f" ({contract.threshold_means})" if contract.threshold_means else ""
        raise ExitError(f"exit criterion {contract.name!r} needs a threshold >= {contract.min_threshold:g}{means}, "
                        f"got {threshold}.")
    return thr


class ExitCriterion:
    """One criterion at one threshold, stateful over a token's iterations: ``reset(batch)``, then
    ``update(...)`` after each iteration with the inputs its contract ``needs``."""

    def __init__(self, contract: ExitContract, threshold: float | None = None) -> None:
        self.contract = contract
        self.threshold = check_threshold(contract, contract.default_threshold if threshold is None else threshold)
        self.state: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self.contract.name

    @property
    def needs(self) -> tuple[str, ...]:
        return self.contract.needs

    @property
    def needs_logits(self) -> bool:
        """Whether the loop must run the readout (coda and head) after every iteration."""
        return "logits" in self.needs or "log_probs" in self.needs

    @property
    def needs_latent(self) -> bool:
        return "latent" in self.needs

    def reset(self, batch: int) -> None:
        self.state = {"batch": int(batch)}

    def update(self, logits: np.ndarray | None = None,
               latent: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(value per row, rows whose value passes the threshold) after one more iteration."""
        sources = {"logits": logits, "log_probs": logits, "latent": latent}
        inputs: dict[str, np.ndarray] = {}
        for need in self.needs:
            if sources[need] is None:
                raise ExitError(f"exit criterion {self.name!r} needs {need}, and the caller passed none.")
            inputs[need] = _log_softmax(sources[need]) if need == "log_probs" else np.asarray(sources[need], np.float64)
        values = np.asarray(self.contract.fn(self.state, inputs), np.float64)
        if values.shape != (self.state["batch"],):
            raise ExitError(f"exit criterion {self.name!r} returned shape {values.shape}; it must return one value "
                            f"per row, shape ({self.state['batch']},).")
        passed = values >= self.threshold if self.contract.exits_when == "at_least" else values < self.threshold
        return values, passed

    def __repr__(self) -> str:
        return f"ExitCriterion({self.name!r}, threshold={self.threshold:g})"


CRITERIA: dict[str, ExitContract] = {}
"""name -> contract, for every registered criterion (in registration order)."""


def register_exit_criterion(name: str, *, default_threshold: float, needs: tuple[str, ...] | list[str],
                            exits_when: Literal["below", "at_least"] = "below", min_threshold: float = 0.0,
                            threshold_means: str = "") -> Callable[[ExitFn], ExitFn]:
    """Register ``fn(state, inputs) -> value per row`` as exit criterion ``name`` with its contract."""

    def deco(fn: ExitFn) -> ExitFn:
        if name in CRITERIA:
            raise ExitError(f"exit criterion {name!r} is already registered; pick another name or "
                            "unregister_exit_criterion it first.")
        CRITERIA[name] = ExitContract(name, fn, float(default_threshold), tuple(needs), exits_when,
                                      float(min_threshold), threshold_means)
        return fn

    return deco


def unregister_exit_criterion(name: str) -> None:
    """Remove a registered criterion (tests register temporary ones)."""
    CRITERIA.pop(name, None)


def get_exit_criterion(name: str, threshold: float | None = None) -> ExitCriterion:
    """A fresh criterion by registered name (built in: ``kl``, ``entropy-diff``, ``latent-diff``,
    ``argmax-stability``, ``none``)."""
    if name not in CRITERIA:
        raise ExitError(f"Unknown exit criterion {name!r}; choose one of {', '.join(CRITERIA)}.")
    return ExitCriterion(CRITERIA[name], threshold)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# -- the built-in criteria (Huginn's) ------------------------------------------------------------
@register_exit_criterion("kl", default_threshold=5e-4, needs=("log_probs",))
def _kl(state: dict[str, Any], inputs: dict[str, np.ndarray]) -> np.ndarray:
    lp = inputs["log_probs"]
    prev = state.get("lp")
    if prev is None:  # Huginn compares the first iteration against the uniform distribution
        prev = np.full_like(lp, -np.log(lp.shape[-1]))
    state["lp"] = lp
    return (np.exp(prev) * (prev - lp)).sum(-1)


@register_exit_criterion("entropy-diff", default_threshold=1e-3, needs=("log_probs",))
def _entropy_diff(state: dict[str, Any], inputs: dict[str, np.ndarray]) -> np.ndarray:
    lp = inputs["log_probs"]
    ent = -(np.exp(lp) * lp).sum(-1)
    prev = state.get("ent", np.full(ent.shape, 100.0))
    state["ent"] = ent
    return np.abs(ent - prev)


@register_exit_criterion("latent-diff", default_threshold=0.03, needs=("latent",))
def _latent_diff(state: dict[str, Any], inputs: dict[str, np.ndarray]) -> np.ndarray:
    latent = inputs["latent"]
    prev = state.get("x")
    state["x"] = latent
    if prev is None:
        return np.full(latent.shape[0], np.inf)
    return np.linalg.norm(prev - latent, axis=-1) / np.maximum(np.linalg.norm(latent, axis=-1), 1e-30)


@register_exit_criterion("argmax-stability", default_threshold=5, needs=("logits",), exits_when="at_least",
                         min_threshold=1, threshold_means="a count of stable iterations")
def _argmax_stability(state: dict[str, Any], inputs: dict[str, np.ndarray]) -> np.ndarray:
    am = np.argmax(inputs["logits"], -1)
    prev = state.get("am", np.full(am.shape, -1))
    count = state.get("n", np.zeros(am.shape, np.int64))
    count = np.where(am == prev, count + 1, 0)
    state["am"], state["n"] = am, count
    return count


@register_exit_criterion("none", default_threshold=0.0, needs=())
def _never(state: dict[str, Any], inputs: dict[str, np.ndarray]) -> np.ndarray:
    return np.full(state["batch"], np.inf)
