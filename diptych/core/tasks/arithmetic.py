"""Multi-digit addition and multiplication: ``"47+385="`` -> ``"432"``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from diptych.core.tasks.base import IntAnswerTask, int_range, register_task

_OPS = {"+": lambda a, b: a + b, "*": lambda a, b: a * b, "-": lambda a, b: a - b}


@register_task("arithmetic")
class Arithmetic(IntAnswerTask):
    """Knobs: ``digits`` per operand (int or (low, high)), ``ops`` drawn uniformly from ``"+"``, ``"-"``, ``"*"``."""

    name = "arithmetic"

    def __init__(self, digits: int | Sequence[int] = (1, 3), ops: Sequence[str] = ("+", "*"),
                 test_fraction: float = 0.2) -> None:
        self.digits = int_range(digits, "arithmetic digits")
        bad = [o for o in ops if o not in _OPS]
        if bad or not ops:
            raise ValueError(f"arithmetic ops must be a non-empty subset of {sorted(_OPS)}, got {list(ops)}.")
        self.ops = tuple(ops)
        self.test_fraction = test_fraction

    def _operand(self, rng: np.random.Generator) -> int:
        d = int(rng.integers(self.digits[0], self.digits[1] + 1))
        return int(rng.integers(0 if d == 1 else 10 ** (d - 1), 10**d))

    def _sample(self, rng: np.random.Generator) -> dict[str, Any]:
        a, b = self._operand(rng), self._operand(rng)
        op = self.ops[int(rng.integers(len(self.ops)))]
        return {"prompt": f"{a}{op}{b}=", "answer": str(_OPS[op](a, b)), "a": a, "b": b, "op": op}

