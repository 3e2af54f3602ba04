"""Built-in rewards on hand-written completions, the tricky ones included."""

from __future__ import annotations

import pytest

from diptych.core.rewards import (
    HAS_MATH_VERIFY,
    extract_answer,
    get_reward,
    math_equal,
    to_number,
)
from diptych.core.tokenizer import CharTokenizer


@pytest.mark.parametrize(("text", "want"), [
    (r"so \boxed{\frac{1}{2}} it is", r"\frac{1}{2}"),
    (r"first \boxed{3}, then \boxed{4}", "4"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    ("Therefore, the answer is 1,000. Let me check: 999 + 1.", "1,000"),
    ("The final answer is $42$.\nThanks!", "42"),
    ("Answer: -3.5", "-3.5"),
    ("I have 3 apples and 5 pears, 8 in all", "8"),
    ("no digits at all", None),
])
def test_extraction_rules_in_order(text, want):
    assert extract_answer(text) == want


def test_extractors_are_selectable_and_validated():
    assert extract_answer(r"\boxed{2} and 7", ["last_number"]) == "7"
    with pytest.raises(ValueError, match="unknown extractor"):
        extract_answer("1", ["boxed", "vibes"])


@pytest.mark.parametrize(("pred", "gold", "same"), [
    (r"\frac{1}{2}", "0.5", True),
    ("1,000", "1000", True),
    ("$1,000", 1000, True),
    ("50%", "0.5", True),
    ("1/2", "0.5", True),
    ("0.333", "1/3", False),
    ("12", "21", False),
    ("1,2", "12", False),
    (r"\text{Paris}", "paris", True),
])
def test_math_equal(pred, gold, same):
    assert math_equal(pred, gold) is same


@pytest.mark.skipif(not HAS_MATH_VERIFY, reason="math-verify not installed")
def test_math_equal_uses_math_verify_for_symbolic_answers():
    assert math_equal("(x+1)^2", "x^2+2x+1")
    assert math_equal(r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2")
    assert not math_equal("x^2", "x^3")


def test_to_number_rejects_non_numbers():
    assert to_number("1,000.5") == 1000.5 and to_number(r"-\frac{3}{4}") == -0.75
    assert to_number("x+1") is None and to_number("1/0") is None and to_number(None) is None


def test_math_reward_on_tricky_completions():
    math = get_reward("math")
    completions = [
        r"<think>0.5 or 1/3?</think> \boxed{\frac{1}{2}}",  # boxed fraction vs 0.5
        "<think>999+1</think>The answer is 1,000. I hope this helps! 7 cats.",  # separator, trailing text
        "<think>The answer is 12</think> so 13",  # number in the reasoning is not the answer
        "I give up",
        "anything",
    ]
    answers = ["0.5", "1000", "12", "4", None]
    assert math(["p"] * 5, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, None]


def test_format_reward_r1_style():
    fmt = get_reward("format")
    cases = {
        "<think>add them</think>The answer is 4.": 1.0,
        "  <think>ok</think>\n4": 1.0,
        "The answer is 4.": 0.0,  # missing tags
        "<think>a</think><think>b</think>4": 0.0,  # two think blocks
        "<think>a</think>   ": 0.0,  # no answer after thinking
        "<think></think>4": 0.0,  # empty reasoning
        "4 <think>late</think>5": 0.0,  # text before the think block
        "<think>unclosed 4": 0.0,
    }
    assert fmt([""] * len(cases), list(cases)) == list(cases.values())


def test_format_reward_with_answer_tags_and_prompt_opened_think():
    fmt = get_reward("format", answer_tags=("<answer>", "</answer>"))
    got = fmt([""] * 4, ["<think>x</think><answer>4</answer>", "<think>x</think><answer>4</answer> extra text",
                         "<think>x</think>4", "<think>x</think><answer>4</answer><answer>5</answer>"])
    assert got == [1.0, 0.0, 0.0, 0.0]
    opened = get_reward("format", think_in_prompt=True, think_tags=("<reason>", "</reason>"))
    assert opened(["", ""], ["steps</reason>4", "<reason>steps</reason>4"]) == [1.0, 0.0]


def test_partial_credit_by_distance():
    pc = get_reward("partial_credit", scale=0.5)
    got = pc([""] * 5, [r"\boxed{100}", r"\boxed{75}", r"\boxed{10}", "no number", r"\boxed{1,000}"],
             answer=["100", "100", "100", "100", "x"])
    assert got == [1.0, 0.5, 0.0, 0.0, None]


def test_overlong_penalty_dapo_shape_in_tokens():
    ov = get_reward("overlong", max_length=20, buffer=10, penalty=1.0)
    # 10 tokens: safe; 15: halfway into the buffer; 20: edge; 25: truncated
    assert ov([""] * 4, [""] * 4, completion_lengths=[10, 15, 20, 25]) == [0.0, -0.5, -1.0, -1.0]
    assert ov([""], [""], completion_ids=[list(range(12))]) == [pytest.approx(-0.2)]
    by_tokenizer = get_reward("overlong", max_length=20, buffer=10, tokenizer=CharTokenizer())
    assert by_tokenizer([""], ["x" * 15]) == [-0.5]
    with pytest.raises(ValueError, match="completion_lengths"):
        ov([""], ["x"])
    with pytest.raises(ValueError, match="buffer"):
        get_reward("overlong", max_length=10, buffer=20)


def test_length_reward_against_budgets():
    exact = get_reward("length", budget=100, alpha=0.5)
    assert exact([""] * 3, [""] * 3, completion_lengths=[100, 150, 400]) == [0.0, -0.25, -0.5]
    capped = get_reward("length", mode="max")
    assert capped([""] * 3, [""] * 3, completion_lengths=[50, 150, 10], budget=[100, 100, None]) == [0.0, -0.5, None]
    with pytest.raises(ValueError, match="budget"):
        get_reward("length")([""], [""], completion_lengths=[1])


def test_unknown_reward_name_suggests_the_closest():
    with pytest.raises(KeyError, match="Did you mean 'format'"):
        get_reward("fromat")
