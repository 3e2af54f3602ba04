"""Code correctness: run the completion's program against test cases in the sandbox.

Binary by default (all tests pass or 0): Magistral found partial credit on code hurt. Samples run
concurrently in threads, each in its own sandboxed process.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from diptych.core.rewards.base import register_reward
from diptych.core.sandbox import SandboxLimits, run_python

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The last fenced code block (```python ... ```), else the whole completion after any think block."""
    text = completion.rsplit("</think>", 1)[-1]
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def _normalise_output(s: str) -> str:
    return "\n".join(line.rstrip() for line in s.strip().splitlines())


class CodeReward:
    """Fraction or all-or-nothing of passing tests from the ``tests`` column.

    Each row's tests are either a list of Python statements (``"assert f(2) == 4"``), appended to
    the program and run together, or a list of ``{"input": stdin, "output": expected_stdout}`` cases,
    each run separately and compared line by line with trailing whitespace ignored.
    """

    name = "code"

    def __init__(self, tests_column: str = "tests", partial: bool = False, timeout_s: float = 5.0,
                 memory_mb: int = 512, max_workers: int = 4) -> None:
        self.tests_column, self.partial, self.max_workers = tests_column, partial, max_workers
        self.limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
        self.required_columns = (tests_column,)

    def score(self, completion: str, tests: Sequence[Any] | None) -> float | None:
        if tests is None:
            return None
        if isinstance(tests, str):
            tests = [tests]
        if not tests:
            raise ValueError("a row has an empty test list; give at least one test or None (not applicable).")
        code = extract_code(completion)
        if all(isinstance(t, str) for t in tests):
            # asserts run one after another so a partial score can count how many passed
            body = "\n".join(f"try:\n    exec({t!r})\n    __passed += 1\nexcept Exception:\n    pass" for t in tests)
            program = f"{code}\n__passed = 0\n{body}\nprint('__PASSED__', __passed)"
            r = run_python(program, limits=self.limits)
            m = re.search(r"__PASSED__ (\d+)\s*$", r.stdout) if r.ok else None
            passed = int(m.group(1)) if m else 0
        elif all(isinstance(t, Mapping) and "input" in t and "output" in t for t in tests):
            passed = 0
            for t in tests:
                r = run_python(code, stdin=str(t["input"]), limits=self.limits)
                passed += int(r.ok and _normalise_output(r.stdout) == _normalise_output(str(t["output"])))
        else:
            raise ValueError("tests must be a list of assert strings or of {'input': ..., 'output': ...} dicts.")
        if self.partial:
            return passed / len(tests)
        return 1.0 if passed == len(tests) else 0.0

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float | None]:
        tests = columns[self.tests_column]
        with ThreadPoolExecutor(max_workers=max(1, self.max_workers)) as pool:
            return list(pool.map(self.score, completions, tests))


register_reward("code")(CodeReward)
