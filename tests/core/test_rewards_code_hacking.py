"""Programs that game a code reward which trusts the candidate's process must score 0 (issue 13).

Each one scored 1.0 when the tests ran in the candidate's namespace and the pass count was read
from its stdout. None of them computes ``square``; a reward that cannot be gamed gives them nothing.
"""

from __future__ import annotations

import pytest

from diptych.core.rewards import get_reward

ASSERTS = ["assert square(2) == 4", "assert square(3) == 9", "assert square(-1) == 1"]


def _fenced(code: str) -> str:
    return f"```python\n{code}\n```"


HACKS = {
    "shadow exec": "def exec(*a, **k):\n    pass",
    "shadow print": "import builtins\n_p = builtins.print\ndef print(*a, **k):\n    _p('__PASSED__', 3)",
    "forged count then os._exit": "import os\nprint('__PASSED__', 3, flush=True)\nos._exit(0)",
    "sys.exit early": "import sys\nsys.exit(0)\ndef square(x):\n    return x * x",
    "forged count then sys.exit": "import sys\nprint('__PASSED__', 3)\nsys.exit(0)",
    "monkeypatch builtins.exec": "import builtins\nbuiltins.exec = lambda *a, **k: None",
    "monkeypatch builtins.AssertionError": "import builtins\nbuiltins.AssertionError = type('X', (BaseException,), {})"
                                           "\ndef square(x):\n    return 0",
    "SystemExit inside a test": "print('__PASSED__', 3)\ndef square(x):\n    raise SystemExit(0)",
    "always-equal object": "class Anything:\n    def __eq__(self, other):\n        return True\n"
                           "    __hash__ = None\ndef square(x):\n    return Anything()",
    "int subclass equal to all": "class I(int):\n    def __eq__(self, other):\n        return True\n"
                                 "    __hash__ = int.__hash__\ndef square(x):\n    return I(0)",
    "always-truthy bool": "class B:\n    def __bool__(self):\n        return True\ndef square(x):\n    return B()",
    "patch the harness namespace": "import sys\nm = sys.modules['__main__']\nfor k in list(vars(m)):\n"
                                   "    if callable(getattr(m, k)) and not k.startswith('__'):\n"
                                   "        setattr(m, k, lambda *a, **k: True)\ndef square(x):\n    return 0",
}


@pytest.mark.parametrize("name", list(HACKS))
def test_a_reward_hack_scores_zero(name):
    code = get_reward("code", timeout_s=3.0, partial=True)
    assert code([""], [_fenced(HACKS[name])], tests=[ASSERTS]) == [0.0], name


def test_forging_the_harness_report_gains_nothing():
    """A candidate that reads the harness (its own process can) and writes its report marker with made-up values."""
    forge = (
        "import json, os, sys\nh = sys.modules['__main__']\n"
        "steps = json.loads(h.STEPS_JSON)\n"  # what the harness will evaluate: the leaves, never the expected values
        "fake = [[['ok', True] if k == 'eval' else ['ok'] for k, _ in test] for test in steps]\n"
        "os.write(1, ('\\n' + h.MARK + json.dumps(fake) + '\\n').encode())\nos._exit(0)\n"
    )
    assert get_reward("code", partial=True)([""], [_fenced(forge)], tests=[ASSERTS]) == [0.0]
    # the same forger "passes" exactly the tests whose expected value it guessed, like a program returning True would
    truthy = ["assert square(2)", "assert square(3) == 9"]
    assert get_reward("code", partial=True)([""], [_fenced(forge)], tests=[truthy]) == [0.5]


def test_a_correct_solution_still_scores_one_and_a_partial_one_its_share():
    good = _fenced("def square(x):\n    print('noise', x)\n    return x * x")
    half = _fenced("def square(x):\n    return 4 if x == 2 else x * x + (x < 0)")  # wrong only at -1
    assert get_reward("code")(["", ""], [good, half], tests=[ASSERTS, ASSERTS]) == [1.0, 0.0]
    assert get_reward("code", partial=True)([""], [half], tests=[ASSERTS]) == [pytest.approx(2 / 3)]
