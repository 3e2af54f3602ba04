"""Follow a value through a chain of permutations written in the prompt: ``"3:DHKTV,EGMSU="`` -> ``"0"``.

The prompt holds a start value and ``hops`` lookup tables, each a random permutation of
``{0, ..., size-1}``. Every table entry is one letter that names both its key and its value
(``letter_of(k, v) = "ABCDE..."[5 k + v]``: ``D`` is 0 -> 3, ``H`` is 1 -> 2), entries in random order.
The answer is the value reached after applying the tables left to right.

Why this task: each hop needs the previous hop's result before it knows which entry to read, and
composing two tables in parallel costs ``size`` lookups where following the chain costs one, so a
model's cheapest algorithm is one hop per unit of depth. Permutations of 5 form S5, whose word
problem has no known constant-depth shortcut (unlike the digit sum of ``running_sum``, which one
attention layer can count). ``hops`` dials the serial work: the task for test-time scaling of
recurrent-depth models. Rows carry ``trace``, the value after every hop, for per-hop supervision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from diptych.core.tasks.base import IntAnswerTask, int_range, register_task

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXY"  # 5 keys x 5 values


def letter_of(key: int, value: int) -> str:
    """The entry letter for ``key -> value``: letters are in row-major (key, value) order over 5 x 5."""
    return _LETTERS[5 * key + value]


def entry_of(letter: str) -> tuple[int, int]:
    """``(key, value)`` of an entry letter; the inverse of :func:`letter_of`."""
    i = _LETTERS.index(letter)
    return divmod(i, 5)


def follow(prompt: str) -> list[int]:
    """The value after each hop of a prompt, parsed from its text alone (an oracle independent of the generator)."""
    start, _, tables = prompt.rstrip("=").partition(":")
    value, trace = int(start), []
    for table in tables.split(","):
        mapping = dict(entry_of(c) for c in table)
        value = mapping[value]
        trace.append(value)
    return trace


@register_task("perm_chain")
class PermChain(IntAnswerTask):
    """Knobs: ``hops`` tables (int or range), ``size`` values per table (2-5), ``shuffle`` entry order."""

    name = "perm_chain"

    def __init__(self, hops: int | Sequence[int] = (2, 5), size: int = 5, shuffle: bool = True,
                 test_fraction: float = 0.2, length: int | Sequence[int] | None = None) -> None:
        # ``length`` is an alias of ``hops`` so generic tools (``depth-sweep --length``) can dial difficulty.
        self.hops = int_range(hops if length is None else length, "perm_chain hops")
        if not 2 <= size <= 5:
            raise ValueError(f"perm_chain size must be between 2 and 5 (one letter per key/value pair), got {size}.")
        self.size, self.shuffle, self.test_fraction = int(size), bool(shuffle), test_fraction

    @property
    def length(self) -> tuple[int, int]:
        """Alias of ``hops``: the knob recipes and ``depth-sweep --length`` turn to make problems longer."""
        return self.hops

    def _sample(self, rng: np.random.Generator) -> dict[str, Any]:
        n = int(rng.integers(self.hops[0], self.hops[1] + 1))
        value = start = int(rng.integers(0, self.size))
        tables, trace = [], []
        for _ in range(n):
            perm = rng.permutation(self.size)
            keys = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
            tables.append("".join(letter_of(int(k), int(perm[k])) for k in keys))
            value = int(perm[value])
            trace.append(value)
        return {"prompt": f"{start}:{','.join(tables)}=", "answer": str(value), "trace": trace, "length": n}
