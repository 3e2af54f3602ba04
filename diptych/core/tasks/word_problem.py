"""The word problem of S3: multiply a list of permutations of 3 items, ``"mul 0352="`` -> ``"4"``.

Each digit 0-5 names one permutation of ``(0, 1, 2)`` (``ELEMENTS``); the answer is the digit of
their product, composed left to right. Unlike ``running_sum`` (a commutative sum that one attention
layer can count), the product depends on the order of the factors, so the natural algorithm folds
one factor per step: the task for test-time scaling of recurrent-depth models. Rows carry
``trace``, the product of every prefix, for per-position supervision.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import permutations
from typing import Any

import numpy as np

from diptych.core.tasks.base import IntAnswerTask, int_range, register_task

ELEMENTS: tuple[tuple[int, ...], ...] = tuple(permutations(range(3)))  # digit d names ELEMENTS[d]


def compose(a: int, b: int) -> int:
    """The digit of "apply ``a``, then ``b``" (left-to-right composition)."""
    pa, pb = ELEMENTS[a], ELEMENTS[b]
    return ELEMENTS.index(tuple(pb[pa[i]] for i in range(3)))


@register_task("word_problem")
class WordProblem(IntAnswerTask):
    """Knobs: ``length`` factors (int or range)."""

    name = "word_problem"

    def __init__(self, length: int | Sequence[int] = (2, 8), test_fraction: float = 0.2) -> None:
        self.length = int_range(length, "word_problem length")
        self.test_fraction = test_fraction

    def _sample(self, rng: np.random.Generator) -> dict[str, Any]:
        k = int(rng.integers(self.length[0], self.length[1] + 1))
        digits = [int(x) for x in rng.integers(0, len(ELEMENTS), size=k)]
        trace, acc = [], digits[0]
        trace.append(acc)
        for d in digits[1:]:
            acc = compose(acc, d)
            trace.append(acc)
        return {"prompt": f"mul {''.join(map(str, digits))}=", "answer": str(acc), "factors": digits,
                "trace": trace, "length": k}
