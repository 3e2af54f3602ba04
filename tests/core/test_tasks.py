"""Built-in tasks: seeded generators, verifiers that accept the reference and reject perturbations, disjoint splits."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core.rewards import CombinedReward
from diptych.core.tasks import available_tasks, get_task, split_of
from diptych.core.tasks.countdown import evaluate
from diptych.core.tokenizer import CharTokenizer

TASKS = ["arithmetic", "countdown", "running_sum", "perm_chain", "word_problem"]


def _columns(rows):
    return {k: [r[k] for r in rows] for k in rows[0]}


def test_registry_lists_the_built_in_tasks():
    assert set(TASKS) <= set(available_tasks())
    with pytest.raises(KeyError, match="Did you mean 'countdown'"):
        get_task("countdwn")
    with pytest.raises(TypeError, match="arithmetic"):
        get_task("arithmetic", digitz=3)


@pytest.mark.parametrize("name", TASKS)
def test_same_seed_same_data_other_seed_other_data(name):
    task = get_task(name)
    a, b, c = task.generate("train", 20, seed=3), task.generate("train", 20, seed=3), task.generate("train", 20, 4)
    assert a == b
    assert [r["prompt"] for r in a] != [r["prompt"] for r in c]


@pytest.mark.parametrize("name", TASKS)
def test_train_and_test_never_share_a_prompt(name):
    task = get_task(name)
    train = {r["prompt"] for seed in range(3) for r in task.generate("train", 200, seed)}
    test = {r["prompt"] for seed in range(3) for r in task.generate("test", 100, seed)}
    assert train and test and not train & test
    assert all(split_of(p, task.test_fraction) == "test" for p in test)


@pytest.mark.parametrize("name", TASKS)
def test_verifier_accepts_the_reference_solution(name):
    task = get_task(name)
    rows = task.generate("test", 50, seed=0)
    refs = [task.reference_solution(r) for r in rows]
    assert task.reward([r["prompt"] for r in rows], refs, **_columns(rows)) == [1.0] * 50
    tok = CharTokenizer()
    for r, ref in zip(rows, refs):
        assert len(r["prompt"]) <= 40 and len(ref) <= 20  # short enough for a tiny char model
        tok.encode(r["prompt"] + ref)  # inside the char vocabulary
        assert task.extract_answer(ref) is not None


def test_arithmetic_rejects_perturbed_answers():
    task = get_task("arithmetic", digits=(2, 3), ops=("+", "-", "*"))
    rows = task.generate("train", 30, seed=1)
    wrong = [str(int(r["answer"]) + 1) for r in rows]
    assert task.reward([""] * 30, wrong, **_columns(rows)) == [0.0] * 30
    row = rows[0]
    ans = row["answer"]
    assert task.reward([""] * 4, [f" {ans}\n", f"{ans} ", f"{ans}0", f"= {ans}"],
                       answer=[ans] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert int(rows[0]["answer"]) == eval(rows[0]["prompt"].rstrip("="))  # the oracle: Python itself


def test_countdown_verifier_is_exact_about_numbers_and_value():
    task = get_task("countdown")
    row = {"numbers": [3, 5, 7], "target": 26}
    cols = {k: [v] for k, v in row.items()}
    check = lambda c: task.reward([""], [c], **cols)[0]
    assert check("3*7+5") == 1.0 and check("5+7*3") == 1.0 and check(" (7*3)+5 \nthanks") == 1.0
    assert check("3*7-5") == 0.0  # wrong value
    assert check("7*3+5+0") == 0.0  # a number that was not given
    assert check("7*7-23") == 0.0  # numbers reused / invented
    assert check("3*7") == 0.0  # a number left out
    assert check("__import__('os')") == 0.0 and check("3**7") == 0.0 and check("") == 0.0
    assert evaluate("8/(3-3)") is None


def test_countdown_reference_perturbations_are_rejected():
    task = get_task("countdown", count=(3, 4), max_number=12)
    rows = task.generate("train", 40, seed=2)
    swapped = []
    for r in rows:
        sol = r["solution"]
        swapped.append(sol.replace("+", "#").replace("-", "+").replace("#", "-") if ("+" in sol or "-" in sol)
                       else sol + "+1")
    got = task.reward([""] * 40, swapped, **_columns(rows))
    values = [evaluate(s)[0] if evaluate(s) else None for s in swapped]
    expected = [1.0 if v == r["target"] and "+1" not in s else 0.0 for v, r, s in zip(values, rows, swapped)]
    assert got == expected and sum(got) < 40


def test_running_sum_matches_numpy_and_rejects_off_by_one():
    task = get_task("running_sum", length=(5, 12), modulo=7)
    rows = task.generate("train", 30, seed=5)
    for r in rows:
        digits = [int(ch) for ch in r["prompt"][len("sum "):-1]]
        assert int(r["answer"]) == int(np.sum(digits)) % 7 and len(digits) == r["length"]
    wrong = [str((int(r["answer"]) + 1) % 7) for r in rows]
    assert task.reward([""] * 30, wrong, **_columns(rows)) == [0.0] * 30


def test_running_sum_show_work_reference():
    task = get_task("running_sum", length=4, modulo=None, show_work=True)
    row = {"digits": [3, 1, 4, 1], "answer": "9", "prompt": "sum 3141="}
    assert task.reference_solution(row) == "3,4,8,9|9"
    assert task.reward([""] * 2, ["3,4,8,9|9", "3,4,8,9|8"], answer=["9", "9"]) == [1.0, 0.0]


def test_perm_chain_matches_an_independent_parse_and_uses_permutations():
    from diptych.core.tasks.perm_chain import entry_of, follow, letter_of

    assert letter_of(0, 3) == "D" and letter_of(1, 2) == "H" and entry_of("Y") == (4, 4)
    assert follow("3:DHKTV,EGMSU=") == [4, 0]  # 3 -> (T: 3->4) -> (U: 4->0)
    task = get_task("perm_chain", hops=(3, 9), size=4)
    rows = task.generate("train", 40, seed=2)
    for r in rows:
        tables = r["prompt"][2:-1].split(",")
        assert len(tables) == r["length"] == len(r["trace"]) and 3 <= r["length"] <= 9
        for t in tables:  # every table is a permutation of range(size), keys in shuffled order
            keys, values = zip(*map(entry_of, t))
            assert sorted(keys) == sorted(values) == list(range(4))
        assert follow(r["prompt"]) == r["trace"] and r["answer"] == str(r["trace"][-1])
    assert any(next(zip(*map(entry_of, r["prompt"][2:6]))) != (0, 1, 2, 3) for r in rows)
    wrong = [str((int(r["answer"]) + 1) % 4) for r in rows]
    assert task.reward([""] * 40, wrong, **_columns(rows)) == [0.0] * 40
    assert get_task("perm_chain", length=7).hops == (7, 7)  # the generic difficulty knob
    with pytest.raises(ValueError, match="size"):
        get_task("perm_chain", size=6)


def test_word_problem_matches_numpy_permutation_products():
    from diptych.core.tasks.word_problem import ELEMENTS

    task = get_task("word_problem", length=(2, 12))
    rows = task.generate("train", 40, seed=4)
    for r in rows:
        state = np.arange(3)
        for i, d in enumerate(r["prompt"][len("mul "):-1]):  # apply each factor to the arrangement in turn
            state = np.asarray(ELEMENTS[int(d)])[state]
            assert tuple(state) == ELEMENTS[r["trace"][i]]
        assert r["answer"] == str(r["trace"][-1])
    # order matters: the group is not commutative, which is what makes the task serial
    assert any(r["trace"][-1] != task._sample(np.random.default_rng(0))["trace"][-1] for r in rows)


def test_task_plugs_into_combined_reward_and_checks_columns():
    task = get_task("arithmetic")
    rows = task.generate("train", 4, seed=0)
    r = CombinedReward({"correct": task})([x["prompt"] for x in rows], [x["answer"] for x in rows],
                                          **_columns(rows))
    assert list(r.total) == [1.0] * 4
    with pytest.raises(KeyError, match="answer"):
        task.reward(["1+1="], ["2"])


def test_bad_knobs_raise_clearly():
    with pytest.raises(ValueError, match="digits"):
        get_task("arithmetic", digits=0)
    with pytest.raises(ValueError, match="ops"):
        get_task("arithmetic", ops=("^",))
    with pytest.raises(ValueError, match="split"):
        get_task("arithmetic").generate("validation", 1, 0)
    with pytest.raises(ValueError, match="empty"):
        get_task("arithmetic", digits=1, ops=("+",), test_fraction=0.0).generate("test", 1, 0)
    with pytest.raises(ValueError, match="loosen"):
        get_task("countdown", count=2, max_number=1, ops=("-",)).generate("train", 1, 0)
