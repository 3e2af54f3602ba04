"""Code correctness: run the completion's program against test cases in the sandbox, judged outside it.

Binary by default (all tests pass or 0): Magistral found partial credit on code hurt. Samples run
concurrently in threads, each in its own sandboxed process.

Why the verdict is computed here and not in the sandbox: everything inside the sandbox shares a
process with the candidate, which can shadow ``exec`` or ``print``, monkeypatch builtins, exit early
or write whatever it likes to stdout, so no pass count or verdict produced in there can be trusted.
Instead each assert test is split here, in the trusted parent, into its *skeleton* (comparisons,
``and``/``or``/``not``, arithmetic, literals, a few pure builtins such as ``len`` or ``sorted``) and its
*leaves* (the smallest sub-expressions that touch the candidate, e.g. ``square(2)``). Only the leaves
go into the sandbox. A harness there imports the candidate as a module (``solution.py``), evaluates
each leaf in its own namespace and sends back plain data (exact ``int``/``float``/``str``/``bool``/
``None``/``bytes`` and lists, tuples, dicts, sets of them; anything else, such as an object whose
``__eq__`` is always true or an ``int`` subclass, is refused). The parent then decodes that data and
evaluates the skeleton with the expected values, which never left it.

So the worst a hostile candidate can do is report values of its choosing for its own leaves, which is
what returning them would have done; the expected values it would have to match are not in its
process. Exiting early, crashing or garbling the report scores 0. Residual: where a test compares two
candidate-computed expressions (``assert f(x) == g(x)``) or checks a bare truth value
(``assert is_prime(7)``), the candidate's process produces everything the verdict depends on; write
tests with literal expected values (``assert f(2) == 4``) for a reward that cannot be gamed.
stdin/stdout tests are judged the same way: the expected output stays in the parent.
"""

from __future__ import annotations

import ast
import json
import operator
import re
import secrets
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


# ---- the harness: runs in the sandbox, imports the candidate, reports leaf values as tagged JSON ----

_HARNESS = r'''
import builtins, importlib.util, json, os, sys
_write, _dumps, _type, _exec, _eval, _dict, _len = os.write, json.dumps, type, exec, eval, dict, len
_list, _tuple, _set, _frozenset, _bytes, _isinst = list, tuple, set, frozenset, bytes, isinstance
_scalars = (_type(None), bool, int, float, str)
STEPS = json.loads(STEPS_JSON)

def _enc(x, depth=0):
    t = _type(x)
    if depth > 50:
        raise ValueError("nested too deep")
    if t in _scalars:
        return x
    if t is _list or t is _tuple or t is _set or t is _frozenset:
        tag = {_list: "l", _tuple: "t", _set: "s", _frozenset: "f"}[t]
        return {tag: [_enc(v, depth + 1) for v in x]}
    if t is _dict:
        return {"d": [[_enc(k, depth + 1), _enc(v, depth + 1)] for k, v in x.items()]}
    if t is _bytes:
        return {"b": x.hex()}
    raise TypeError("not plain data")

def _main():
    out = []
    try:
        spec = importlib.util.spec_from_file_location("solution", "solution.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["solution"] = mod
        spec.loader.exec_module(mod)
        ns = _dict(vars(mod))
    except BaseException:
        ns = None
    for steps in STEPS:
        res = []
        for kind, src in steps:
            if ns is None:
                res.append(["err"])
                break
            try:
                if kind == "exec":
                    _exec(src, ns)
                    res.append(["ok"])
                else:
                    res.append(["ok", _enc(_eval(src, ns))])
            except BaseException:
                res.append(["err"])
                if kind == "exec":
                    break
        out.append(res)
    try:
        payload = _dumps(out)
    except BaseException:
        payload = "null"
    _write(1, ("\n" + MARK + payload + "\n").encode())

_main()
'''


def _decode(x: Any, depth: int = 0) -> Any:
    """Tagged JSON from the harness back to plain Python data; anything unexpected raises ValueError."""
    if depth > 60:
        raise ValueError("nested too deep")
    if x is None or type(x) in (bool, int, float, str):
        return x
    if type(x) is dict and len(x) == 1:
        (tag, v), = x.items()
        if tag == "b" and type(v) is str:
            return bytes.fromhex(v)
        if type(v) is list:
            if tag == "d":
                return {_decode(k, depth + 1): _decode(w, depth + 1) for k, w in v}
            items = [_decode(w, depth + 1) for w in v]
            kinds = {"l": list, "t": tuple, "s": set, "f": frozenset}
            if tag in kinds:
                return kinds[tag](items)
    raise ValueError("malformed value in the harness report")


# ---- the skeleton: evaluated here on plain data; only the leaves ran in the sandbox ----

def _eq(a: Any, b: Any) -> bool:
    """Python's ``==`` on plain data, except that a bool equals only a bool: ``True`` is not an answer of ``1``."""
    if (type(a) is bool) != (type(b) is bool):
        return False
    if type(a) in (list, tuple) or type(b) in (list, tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is dict and type(b) is dict:
        return a.keys() == b.keys() and all(_eq(v, b[k]) for k, v in a.items())
    return a == b


def _contains(a: Any, b: Any) -> bool:
    return a in b if type(b) in (str, bytes, dict) else any(_eq(a, x) for x in b)


_CMP = {ast.Eq: _eq, ast.NotEq: lambda a, b: not _eq(a, b), ast.Lt: operator.lt, ast.LtE: operator.le,
        ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
        ast.In: _contains, ast.NotIn: lambda a, b: not _contains(a, b)}
_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_PURE = {"abs": abs, "round": round, "len": len, "sorted": sorted, "list": list, "tuple": tuple, "set": set,
         "frozenset": frozenset, "min": min, "max": max, "sum": sum, "int": int, "float": float, "str": str,
         "bool": bool}
_BIG = 1 << 4096


def _binop(op: type, a: Any, b: Any) -> Any:
    """Arithmetic on reported values, bounded so a forged huge number cannot stall the trainer."""
    numeric = all(type(v) in (int, float) for v in (a, b))
    if op is ast.Add and type(a) is type(b) and type(a) in (str, list, tuple):
        return a + b
    if not numeric or any(type(v) is int and abs(v) > _BIG for v in (a, b)):
        raise ValueError("arithmetic on reported values is for bounded numbers only")
    return _BIN[op](a, b)


class _Plan:
    """One test split into sandbox steps (``exec`` statements, ``eval`` leaves) and skeletons to judge here."""

    def __init__(self, test: str) -> None:
        try:
            tree = ast.parse(test)
        except SyntaxError as e:
            raise ValueError(f"code test {test!r} is not valid Python: {e.msg}.") from e
        self.steps: list[tuple[str, str]] = []
        self.asserts: list[Any] = []
        for stmt in tree.body:
            if isinstance(stmt, ast.Assert):
                self.asserts.append(self._split(stmt.test))
            else:
                self.steps.append(("exec", ast.unparse(stmt)))
        if not self.asserts:
            raise ValueError(f"code test {test!r} has no assert; each test needs one (e.g. 'assert f(2) == 4') "
                             "so that its expected value can be checked outside the sandbox.")

    def _leaf(self, node: ast.expr) -> tuple[str, int]:
        self.steps.append(("eval", ast.unparse(node)))
        return ("leaf", len(self.steps) - 1)

    def _split(self, node: ast.expr) -> Any:
        try:
            return ("lit", ast.literal_eval(node))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            pass
        if isinstance(node, ast.Compare) and all(type(op) in _CMP for op in node.ops):
            return ("cmp", [type(op) for op in node.ops], [self._split(n) for n in [node.left, *node.comparators]])
        if isinstance(node, ast.BoolOp):
            return ("and" if isinstance(node.op, ast.And) else "or", [self._split(v) for v in node.values])
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
            return (type(node.op).__name__, self._split(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
            return ("bin", type(node.op), self._split(node.left), self._split(node.right))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _PURE
                and not node.keywords and not any(isinstance(a, ast.Starred) for a in node.args)):
            return ("call", node.func.id, [self._split(a) for a in node.args])
        if isinstance(node, ast.Subscript) and not isinstance(node.slice, ast.Slice):
            return ("index", self._split(node.value), self._split(node.slice))
        if isinstance(node, (ast.Tuple, ast.List)) and not any(isinstance(e, ast.Starred) for e in node.elts):
            return ("tuple" if isinstance(node, ast.Tuple) else "list", [self._split(e) for e in node.elts])
        return self._leaf(node)

    def _eval(self, sk: Any, values: list[Any]) -> Any:
        kind = sk[0]
        if kind == "lit":
            return sk[1]
        if kind == "leaf":
            return values[sk[1]]
        if kind == "cmp":
            operands = [self._eval(s, values) for s in sk[2]]
            return all(_CMP[op](a, b) for op, a, b in zip(sk[1], operands, operands[1:], strict=False))
        if kind in ("and", "or"):
            result = None
            for s in sk[1]:
                result = self._eval(s, values)
                if bool(result) is (kind == "or"):
                    return result
            return result
        if kind == "Not":
            return not self._eval(sk[1], values)
        if kind in ("USub", "UAdd"):
            v = self._eval(sk[1], values)
            if type(v) not in (int, float):
                raise ValueError("sign of a non-number")
            return -v if kind == "USub" else v
        if kind == "bin":
            return _binop(sk[1], self._eval(sk[2], values), self._eval(sk[3], values))
        if kind == "call":
            return _PURE[sk[1]](*[self._eval(s, values) for s in sk[2]])
        if kind == "index":
            return self._eval(sk[1], values)[self._eval(sk[2], values)]
        items = [self._eval(s, values) for s in sk[1]]
        return tuple(items) if kind == "tuple" else items

    def passed(self, report: Any) -> bool:
        """Whether the harness's step results satisfy every assert; malformed or failed steps fail the test."""
        if type(report) is not list or len(report) != len(self.steps):
            return False
        values: list[Any] = []
        for (kind, _), r in zip(self.steps, report, strict=True):
            if type(r) is not list or not r or r[0] != "ok" or len(r) != (2 if kind == "eval" else 1):
                return False
            values.append(_decode(r[1]) if kind == "eval" else None)
        return all(bool(self._eval(sk, values)) for sk in self.asserts)  # plain data: bool() runs no candidate code


def _judge(plans: Sequence[_Plan], stdout: str, mark: str) -> list[bool]:
    lines = [line for line in stdout.splitlines() if line.startswith(mark)]
    if not lines:
        return [False] * len(plans)
    try:
        reports = json.loads(lines[-1][len(mark):])
    except (ValueError, RecursionError):
        return [False] * len(plans)
    if type(reports) is not list or len(reports) != len(plans):
        return [False] * len(plans)
    verdicts = []
    for plan, report in zip(plans, reports, strict=True):
        try:
            verdicts.append(plan.passed(report))
        except Exception:  # a reported value that breaks the skeleton (TypeError, ZeroDivision...) fails its test
            verdicts.append(False)
    return verdicts


class CodeReward:
    """Fraction or all-or-nothing of passing tests from the ``tests`` column.

    Each row's tests are either a list of Python assert statements (``"assert f(2) == 4"``, optionally
    preceded by setup statements in the same string), run in order in one sandboxed process against the
    candidate loaded as a module and judged here (see the module docstring), or a list of
    ``{"input": stdin, "output": expected_stdout}`` cases, each run separately and compared line by line
    with trailing whitespace ignored.
    """

    name = "code"

    def __init__(self, tests_column: str = "tests", partial: bool = False, timeout_s: float = 5.0,
                 memory_mb: int = 512, max_workers: int = 4) -> None:
        self.tests_column, self.partial, self.max_workers = tests_column, partial, max_workers
        self.limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
        self.required_columns = (tests_column,)

    def _assert_tests(self, code: str, tests: Sequence[str]) -> int:
        plans = [_Plan(t) for t in tests]
        # a fresh marker only keeps runs apart; it is no secret (the candidate can read the harness)
        mark = f"__DIPTYCH_RESULTS_{secrets.token_hex(8)}__:"
        harness = f"STEPS_JSON = {json.dumps([p.steps for p in plans])!r}\nMARK = {mark!r}\n{_HARNESS}"
        r = run_python(harness, limits=self.limits, files={"solution.py": code})
        return sum(_judge(plans, r.stdout, mark))

    def score(self, completion: str, tests: Sequence[Any] | None) -> float | None:
        if tests is None:
            return None
        if isinstance(tests, str):
            tests = [tests]
        if not tests:
            raise ValueError("a row has an empty test list; give at least one test or None (not applicable).")
        code = extract_code(completion)
        if all(isinstance(t, str) for t in tests):
            passed = self._assert_tests(code, tests)
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
