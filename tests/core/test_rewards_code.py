"""The code reward runs completions against tests in the sandbox."""

from __future__ import annotations

import pytest

from diptych.core.rewards import CombinedReward, extract_code, get_reward

GOOD = "Here you go:\n```python\ndef square(x):\n    return x * x\n```\nDone."
WRONG = "```python\ndef square(x):\n    return x + x\n```"
LOOP = "```python\ndef square(x):\n    while True:\n        pass\n```"
ASSERTS = ["assert square(2) == 4", "assert square(3) == 9", "assert square(0) == 0"]


def test_extract_code_takes_the_last_fenced_block():
    assert extract_code("```py\na = 1\n```\ntext\n```python\nb = 2\n```") == "b = 2\n"
    assert extract_code("<think>```python\nx```</think>print(1)") == "print(1)"


def test_assert_tests_binary_and_partial():
    code = get_reward("code", timeout_s=3.0)
    assert code(["", "", ""], [GOOD, WRONG, "no code here"], tests=[ASSERTS] * 3) == [1.0, 0.0, 0.0]
    partial = get_reward("code", partial=True)
    # x + x agrees with x * x at 2 and 0
    assert partial([""], [WRONG], tests=[ASSERTS]) == [pytest.approx(2 / 3)]


def test_stdin_stdout_tests_and_not_applicable_rows():
    prog = "```python\nn = int(input())\nprint(n * n)\n```"
    io = [{"input": "3\n", "output": "9\n"}, {"input": "5", "output": "25"}]
    assert get_reward("code")(["", ""], [prog, prog], tests=[io, None]) == [1.0, None]


def test_an_infinite_loop_scores_zero_within_the_timeout():
    combo = CombinedReward({"code": get_reward("code", timeout_s=1.0)}, timeout=10)
    r = combo(["", ""], [LOOP, GOOD], tests=[ASSERTS, ASSERTS])
    assert list(r.total) == [0.0, 1.0] and r.failures == 0


def test_malformed_tests_raise_a_clear_error():
    with pytest.raises(ValueError, match="assert strings"):
        get_reward("code")([""], [GOOD], tests=[[42]])
