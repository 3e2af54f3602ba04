"""The Task contract, the split rule that keeps train and test apart, and the task registry.

A task is a seeded problem generator plus its verifier. Problems are assigned to a split by a
stable hash of their prompt, so train and test never share a prompt whatever the seeds, and a
new seed only draws a different sample from the same split.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

Split = Literal["train", "test"]
_SPLIT_CODE = {"train": 0, "test": 1}
_REGISTRY: dict[str, Callable[..., Task]] = {}


def split_of(prompt: str, test_fraction: float) -> Split:
    """Which split a prompt belongs to: a stable function of its text (sha1), independent of any seed."""
    bucket = int.from_bytes(hashlib.sha1(prompt.encode()).digest()[:4], "big") % 10_000
    return "test" if bucket < test_fraction * 10_000 else "train"


def parse_int(completion: str) -> str | None:
    """The completion is one integer, surrounded by whitespace at most; anything else is no answer."""
    m = re.fullmatch(r"\s*(-?\d+)\s*", completion)
    return m.group(1) if m else None


def int_range(value: int | Sequence[int], what: str) -> tuple[int, int]:
    lo, hi = (value, value) if isinstance(value, int) else tuple(value)
    if not 1 <= lo <= hi:
        raise ValueError(f"{what} must be a positive int or a (low, high) pair with low <= high, got {value!r}.")
    return int(lo), int(hi)


class Task(ABC):
    """A verifiable task: ``generate`` rows, ``reward`` completions (1.0 right, 0.0 wrong).

    Subclasses implement ``_sample(rng) -> row`` (a dict with ``prompt`` and ``answer``),
    ``reference_solution`` and ``extract_answer``/``is_correct``. Rows also carry ``task``.
    """

    name: str = "task"
    test_fraction: float = 0.2

    @property
    def required_columns(self) -> tuple[str, ...]:
        return ("answer",)

    @abstractmethod
    def _sample(self, rng: np.random.Generator) -> dict[str, Any]: ...

    @abstractmethod
    def reference_solution(self, row: dict[str, Any]) -> str:
        """A completion the verifier accepts: the target of SFT warm starts."""

    @abstractmethod
    def is_correct(self, completion: str, row: dict[str, Any]) -> bool: ...

    def extract_answer(self, completion: str) -> str | None:
        return parse_int(completion)

    def generate(self, split: Split, n: int, seed: int) -> list[dict[str, Any]]:
        """``n`` rows of ``split``, the same for the same seed; may repeat problems when the space is small."""
        if split not in _SPLIT_CODE:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}.")
        rng = np.random.default_rng([int(seed), _SPLIT_CODE[split], _stable_id(self.name)])
        rows: list[dict[str, Any]] = []
        tries = 0
        while len(rows) < n:
            row = self._sample(rng)
            tries += 1
            if split_of(row["prompt"], self.test_fraction) == split:
                rows.append({**row, "task": self.name})
            elif tries > 100 * n + 1000 and not rows:
                raise ValueError(f"{self.name}: the {split} split looks empty for these knobs "
                                 "(the problem space is too small); raise the difficulty or test_fraction.")
        return rows

    def reward(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        missing = [c for c in self.required_columns if c not in columns]
        if missing:
            raise KeyError(f"task {self.name!r} needs column(s) {missing} from its rows; got {sorted(columns)}.")
        out = []
        for i, completion in enumerate(completions):
            row = {k: columns[k][i] for k in self.required_columns}
            out.append(1.0 if self.is_correct(completion, row) else 0.0)
        return out

    # A task is itself a reward function: CombinedReward({"task": task, ...}) works.
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        return self.reward(prompts, completions, **columns)


class IntAnswerTask(Task):
    """A task whose answer is one integer: the reference is the answer, and a completion must be exactly it."""

    def reference_solution(self, row: dict[str, Any]) -> str:
        return str(row["answer"])

    def is_correct(self, completion: str, row: dict[str, Any]) -> bool:
        got = self.extract_answer(completion)
        return got is not None and int(got) == int(row["answer"])


def _stable_id(name: str) -> int:
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:4], "big")


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    def deco(cls: Callable[..., Task]) -> Callable[..., Task]:
        _REGISTRY[name] = cls
        return cls

    return deco


def available_tasks() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str, **knobs: Any) -> Task:
    """Build a built-in task by name with its difficulty knobs, e.g. ``get_task("arithmetic", digits=3)``."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"Unknown task {name!r}.{hint} Available: {', '.join(available_tasks())}.")
    try:
        return _REGISTRY[name](**knobs)
    except TypeError as e:
        raise TypeError(f"task {name!r}: {e}") from e
