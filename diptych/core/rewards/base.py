"""The reward interface, the weighted combinator, and the registry of built-in rewards.

A reward is any callable ``fn(prompts, completions, **columns) -> sequence of float | None``, one
value per completion; ``None`` means "does not apply to this sample" and is left out of the sum.
Dataset columns (the gold ``answer``, code ``tests``, token lengths, ...) arrive as keyword lists.

A reward must never crash a run: :class:`CombinedReward` runs every reward in its own daemon
thread (async rewards in their own event loop, so they overlap), gives each a timeout, and turns
an exception, a timeout, a wrong-length result or a non-finite value into reward 0 for the
affected samples plus a logged, counted failure. A batch that raises is retried one sample at a
time so that one bad completion costs only its own reward.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger("diptych.rewards")

RewardFn = Callable[..., Sequence[float | None]]

_REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Register a reward factory under ``name`` so configs can select it by string."""

    def deco(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered.")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def get_reward(name: str, **kw: Any) -> RewardFn:
    """Build the registered reward ``name`` with keyword options (e.g. ``get_reward("overlong", max_length=512)``)."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"Unknown reward {name!r}.{hint} Available: {', '.join(available_rewards())}.")
    return _REGISTRY[name](**kw)


@dataclasses.dataclass
class RewardResult:
    """Weighted per-sample totals, each component unweighted (NaN where not applicable), and failure counts."""

    total: np.ndarray
    components: dict[str, np.ndarray]
    failures: int = 0
    failures_by_reward: dict[str, int] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Means for logging: ``reward``, ``reward/<name>`` (over applicable samples), ``reward/failures``."""
        out = {"reward": float(np.mean(self.total)) if self.total.size else 0.0}
        for name, values in self.components.items():
            ok = values[~np.isnan(values)]
            out[f"reward/{name}"] = float(ok.mean()) if ok.size else float("nan")
        out["reward/failures"] = float(self.failures)
        return out


def _reward_name(fn: Any, index: int) -> str:
    name = getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return str(name) if name != "<lambda>" else f"reward_{index}"


def _accepted_columns(fn: Any, columns: Mapping[str, Any]) -> dict[str, Any]:
    """Pass every column to ``**kwargs`` rewards, and only the named ones to the others."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return dict(columns)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(columns)
    return {k: v for k, v in columns.items() if k in params}


def _call(fn: Any, prompts: list[str], completions: list[str], columns: dict[str, Any]) -> Any:
    out = fn(prompts, completions, **columns)
    if inspect.isawaitable(out):
        async def _await() -> Any:
            return await out

        out = asyncio.run(_await())
    return out


class _Job(threading.Thread):
    """One reward call in a daemon thread: a stuck reward can be abandoned without blocking shutdown."""

    def __init__(self, fn: Any, args: tuple[Any, ...]) -> None:
        super().__init__(daemon=True)
        self.fn, self.args = fn, args
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = _call(self.fn, *self.args)
        except BaseException as e:  # a reward's bug is a logged failure, never a crashed run
            self.error = e


class CombinedReward:
    """Weighted sum of rewards with per-component outputs for logging, concurrency and failure isolation.

    ``rewards`` is a dict ``{name: fn}`` or a list whose items are reward callables, registered
    names, or ``(name, fn)`` pairs. ``weights`` is a dict by name or a list in the same order
    (default 1.0 each). ``timeout`` (seconds) bounds each reward's call on the whole batch.
    """

    def __init__(self, rewards: Mapping[str, RewardFn] | Sequence[Any], weights: Mapping[str, float] |
                 Sequence[float] | None = None, timeout: float = 60.0) -> None:
        items: list[tuple[str, RewardFn]] = []
        if isinstance(rewards, Mapping):
            items = [(str(k), v) for k, v in rewards.items()]
        else:
            for i, r in enumerate(rewards):
                if isinstance(r, str):
                    items.append((r, get_reward(r)))
                elif isinstance(r, tuple) and len(r) == 2:
                    items.append((str(r[0]), r[1]))
                else:
                    items.append((_reward_name(r, i), r))
        if not items:
            raise ValueError("CombinedReward needs at least one reward.")
        for name, fn in items:
            if not callable(fn):
                raise TypeError(f"reward {name!r} is not callable: {fn!r}.")
        names = [n for n, _ in items]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}; pass a dict to name them.")
        if weights is None:
            w = dict.fromkeys(names, 1.0)
        elif isinstance(weights, Mapping):
            unknown = set(weights) - set(names)
            if unknown:
                raise ValueError(f"weights for unknown rewards {sorted(unknown)}; rewards are {names}.")
            w = {n: float(weights.get(n, 1.0)) for n in names}
        else:
            if len(weights) != len(names):
                raise ValueError(f"got {len(weights)} weights for {len(names)} rewards ({names}).")
            w = {n: float(x) for n, x in zip(names, weights)}
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}.")
        self.rewards = dict(items)
        self.weights = w
        self.timeout = float(timeout)

    def _check_columns(self, n: int, columns: Mapping[str, Any]) -> None:
        for name, fn in self.rewards.items():
            missing = [c for c in getattr(fn, "required_columns", ()) if c not in columns]
            if missing:
                raise KeyError(f"reward {name!r} needs column(s) {missing}; the batch has {sorted(columns)}. "
                               "Add them to the dataset rows or pass them to the reward call.")
        for k, v in columns.items():
            if isinstance(v, (list, tuple, np.ndarray)) and len(v) != n:
                raise ValueError(f"column {k!r} has {len(v)} values for {n} completions.")

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> RewardResult:
        prompts, completions = list(prompts), list(completions)
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts for {n} completions; repeat each prompt per completion.")
        self._check_columns(n, columns)
        jobs = {}
        for name, fn in self.rewards.items():
            job = _Job(fn, (prompts, completions, _accepted_columns(fn, columns)))
            job.start()
            jobs[name] = job
        deadline = time.monotonic() + self.timeout
        components: dict[str, np.ndarray] = {}
        fails: dict[str, int] = {}
        errors: list[str] = []
        for name, job in jobs.items():
            job.join(max(0.0, deadline - time.monotonic()))
            values, nfail, err = self._collect(name, job, prompts, completions, columns)
            components[name] = values
            fails[name] = nfail
            if err:
                errors.append(err)
                log.warning("reward %r: %s", name, err)
        total = np.zeros(n, dtype=np.float64)
        for name, values in components.items():
            total += self.weights[name] * np.nan_to_num(values, nan=0.0)
        return RewardResult(total, components, sum(fails.values()), fails, errors)

    def _collect(self, name: str, job: _Job, prompts: list[str], completions: list[str],
                 columns: Mapping[str, Any]) -> tuple[np.ndarray, int, str | None]:
        n = len(completions)
        if job.is_alive():
            return np.zeros(n), n, f"timed out after {self.timeout:g}s; all {n} samples scored 0"
        if job.error is None:
            values, bad = _to_array(job.result, n)
            if bad is None:
                return values, 0, None
            err = bad
        else:
            err = f"raised {type(job.error).__name__}: {job.error}"
        # Retry one sample at a time so that one bad completion costs only its own reward.
        fn = self.rewards[name]
        out = np.zeros(n)
        nfail = 0
        deadline = time.monotonic() + self.timeout
        for i in range(n):
            cols = {k: [v[i]] if isinstance(v, (list, tuple, np.ndarray)) and len(v) == n else v
                    for k, v in _accepted_columns(fn, columns).items()}
            single = _Job(fn, ([prompts[i]], [completions[i]], cols))
            single.start()
            single.join(max(0.0, deadline - time.monotonic()))
            value, bad1 = (None, "timed out") if single.is_alive() else (
                (None, str(single.error)) if single.error else _to_array(single.result, 1))
            if bad1 is None and not np.isinf(value[0]):
                out[i] = value[0]
            else:
                nfail += 1
        return out, nfail, f"{err}; {nfail} of {n} samples failed alone and scored 0"


def _to_array(result: Any, n: int) -> tuple[np.ndarray, str | None]:
    """NaN marks "not applicable" (None); +-inf marks a non-finite value, counted as a failure and scored 0."""
    try:
        values = list(result)
    except TypeError:
        return np.zeros(n), f"returned {type(result).__name__}, not a sequence of floats"
    if len(values) != n:
        return np.zeros(n), f"returned {len(values)} values for {n} completions"
    out = np.empty(n)
    for i, v in enumerate(values):
        if v is None:
            out[i] = np.nan
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            return np.zeros(n), f"returned a non-number {v!r}"
        out[i] = f if math.isfinite(f) else np.inf
    if np.isinf(out).any():
        out[np.isinf(out)] = 0.0
        return out, "returned a non-finite value"
    return out, None
