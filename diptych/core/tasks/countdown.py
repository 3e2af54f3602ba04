"""Countdown: reach the target with the given numbers, each used exactly once, and + - * /.

``"3 5 7 to 26:"`` -> ``"3*7+5"``. Every generated target is reachable (it is built from a random
expression over the numbers); the verifier accepts any correct expression, not just ours.
"""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from diptych.core.tasks.base import Task, int_range, register_task

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction | None:
    if op == "/":
        return None if b == 0 else a / b
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def _show(node: Any) -> tuple[str, int]:
    """Print with the fewest parentheses; returns (text, precedence)."""
    if isinstance(node, int):
        return str(node), 3
    op, left, right = node
    (lt, lp), (rt, rp) = _show(left), _show(right)
    if lp < _PREC[op]:
        lt = f"({lt})"
    if rp < _PREC[op] or (rp == _PREC[op] and op in "-/"):
        rt = f"({rt})"
    return f"{lt}{op}{rt}", _PREC[op]


def evaluate(expression: str) -> tuple[Fraction, list[int]] | None:
    """Exact value and the integer literals of an arithmetic expression; None if it is anything else."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None
    numbers: list[int] = []

    def walk(node: ast.AST) -> Fraction | None:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            a, b = walk(node.left), walk(node.right)
            return None if a is None or b is None else _apply(_AST_OPS[type(node.op)], a, b)
        return None

    if len(expression) > 200:
        return None
    value = walk(tree.body)
    return None if value is None else (value, numbers)


@register_task("countdown")
class Countdown(Task):
    """Knobs: ``count`` numbers (int or range), each in 1..``max_number``; targets in 1..``max_target``."""

    name = "countdown"

    def __init__(self, count: int | Sequence[int] = 3, max_number: int = 10, max_target: int = 100,
                 ops: Sequence[str] = ("+", "-", "*", "/"), test_fraction: float = 0.2) -> None:
        self.count = int_range(count, "countdown count")
        if self.count[0] < 2:
            raise ValueError("countdown needs at least 2 numbers.")
        if max_number < 1 or max_target < 1:
            raise ValueError(f"max_number and max_target must be >= 1, got {max_number}, {max_target}.")
        if not ops or any(o not in _PREC for o in ops):
            raise ValueError(f"countdown ops must be a non-empty subset of {sorted(_PREC)}, got {list(ops)}.")
        self.max_number, self.max_target, self.ops = max_number, max_target, tuple(ops)
        self.test_fraction = test_fraction

    @property
    def required_columns(self) -> tuple[str, ...]:
        return ("numbers", "target")

    def _sample(self, rng: np.random.Generator) -> dict[str, Any]:
        for _ in range(5_000):
            k = int(rng.integers(self.count[0], self.count[1] + 1))
            numbers = [int(x) for x in rng.integers(1, self.max_number + 1, size=k)]
            nodes: list[Any] = list(numbers)
            values = [Fraction(x) for x in numbers]
            ok = True
            while len(nodes) > 1:
                i, j = (int(x) for x in rng.choice(len(nodes), size=2, replace=False))
                op = self.ops[int(rng.integers(len(self.ops)))]
                v = _apply(op, values[i], values[j])
                if v is None or v.denominator != 1 or v < 0:  # integer, non-negative intermediates only
                    ok = False
                    break
                node = (op, nodes[i], nodes[j])
                for idx in sorted((i, j), reverse=True):
                    del nodes[idx], values[idx]
                nodes.append(node)
                values.append(v)
            if ok and 1 <= values[0] <= self.max_target:
                target = int(values[0])
                shown = sorted(numbers)
                return {"prompt": f"{' '.join(map(str, shown))} to {target}:", "answer": str(target),
                        "numbers": shown, "target": target, "solution": _show(nodes[0])[0]}
        raise ValueError(f"countdown found no reachable target in 1..{self.max_target} with numbers up to "
                         f"{self.max_number} and ops {self.ops}; loosen the knobs.")

    def reference_solution(self, row: dict[str, Any]) -> str:
        return row["solution"]

    def extract_answer(self, completion: str) -> str | None:
        text = completion.strip().split("\n")[0].strip()
        return text if text and evaluate(text) is not None else None

    def is_correct(self, completion: str, row: dict[str, Any]) -> bool:
        expr = self.extract_answer(completion)
        if expr is None:
            return False
        value, used = evaluate(expr)  # type: ignore[misc]
        return value == int(row["target"]) and Counter(used) == Counter(int(x) for x in row["numbers"])
