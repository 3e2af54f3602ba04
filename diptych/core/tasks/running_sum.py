"""Running sum of a digit list, modulo m: ``"sum 31415="`` -> ``"4"``.

The answer depends on every digit in order, and each extra digit is one more sequential step, so
``length`` dials how much serial computation a problem needs: the task for recurrent-depth
experiments (more latent iterations should help longer lists). ``show_work=True`` makes the
reference spell out the running sums (``"3,4,8,9,14|4"``), a chain-of-thought baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from diptych.core.tasks.base import Task, int_range, parse_int, register_task


@register_task("running_sum")
class RunningSum(Task):
    """Knobs: ``length`` digits (int or range), ``modulo`` (None: the plain sum), ``show_work``."""

    name = "running_sum"

    def __init__(self, length: int | Sequence[int] = (4, 8), modulo: int | None = 10, show_work: bool = False,
                 test_fraction: float = 0.2) -> None:
        self.length = int_range(length, "running_sum length")
        if modulo is not None and modulo < 2:
            raise ValueError(f"running_sum modulo must be >= 2 or None, got {modulo}.")
        self.modulo, self.show_work, self.test_fraction = modulo, show_work, test_fraction

    def _sample(self, rng: np.random.Generator) -> dict[str, Any]:
        k = int(rng.integers(self.length[0], self.length[1] + 1))
        digits = [int(x) for x in rng.integers(0, 10, size=k)]
        total = sum(digits) if self.modulo is None else sum(digits) % self.modulo
        return {"prompt": f"sum {''.join(map(str, digits))}=", "answer": str(total), "digits": digits,
                "length": k}

    def reference_solution(self, row: dict[str, Any]) -> str:
        if not self.show_work:
            return str(row["answer"])
        partial = np.cumsum(row["digits"]).tolist()
        return ",".join(map(str, partial)) + "|" + str(row["answer"])

    def extract_answer(self, completion: str) -> str | None:
        return parse_int(completion.rsplit("|", 1)[-1]) if self.show_work else parse_int(completion)

    def is_correct(self, completion: str, row: dict[str, Any]) -> bool:
        got = self.extract_answer(completion)
        return got is not None and int(got) == int(row["answer"])
