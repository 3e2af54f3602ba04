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


def test_assert_forms_are_judged_on_plain_data_outside_the_sandbox():
    prog = "```python\ndef f(xs):\n    return sorted(xs)\ndef g(x):\n    return (x, x)\ndef h():\n    return None\n```"
    tests = [
        "assert f([3, 1, 2]) == [1, 2, 3]",
        "xs = [5, 4]\nassert f(xs) == sorted(xs) and len(f(xs)) == 2",
        "assert abs(f([0.1])[0] - 0.1) < 1e-9",
        "assert 0 < f([2, 1])[0] <= 1 and 3 not in f([1, 2])",
        "assert g(1) == (1, 1) and g(1) != [1, 1]",  # a tuple is not a list, as in Python
        "assert h() is None",
        "assert not f([])",
        "assert f([1]) == [2]",  # wrong on purpose: the only failing test
    ]
    assert get_reward("code", partial=True)([""], [prog], tests=[tests]) == [pytest.approx(7 / 8)]


def test_a_test_without_an_assert_is_rejected():
    with pytest.raises(ValueError, match="no assert"):
        get_reward("code")([""], [GOOD], tests=[["square(2)"]])


def test_a_bool_is_not_an_integer_answer():
    yes = "```python\ndef square(x):\n    return True\n```"
    assert get_reward("code", partial=True)([""], [yes], tests=[["assert square(1) == 1", "assert square(1)"]]) == [
        pytest.approx(0.5)]
