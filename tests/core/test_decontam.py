"""Decontamination measures exact and n-gram overlap, and applies Tulu 3's 2% rule."""

from __future__ import annotations

import pytest

from diptych.core.decontam import decontaminate, ngrams, normalise, overlap
from diptych.core.tasks import get_task


def test_normalise_folds_case_space_and_punctuation():
    assert normalise("  What IS 2+2?\n") == normalise("what is 2 2") == "what is 2 2"


def test_exact_and_ngram_fractions_by_hand():
    evals = ["What is the capital of France?", "Compute the sum of the first ten primes please"]
    train = [
        "what is the capital of  france",  # exact after normalisation
        "Tell me: compute the sum of the first ten primes",  # shares a 5-gram, not exact
        "Name a prime number",  # clean
        "How tall is Everest?",  # clean
    ]
    r = overlap(train, evals, n=5)
    assert r.exact_indices == [0] and r.exact_fraction == 0.25
    assert r.ngram_indices == [0, 1] and r.ngram_fraction == 0.5
    assert r.should_drop_source() and "25.00%" in r.summary()
    kept, _ = decontaminate([{"prompt": p} for p in train], evals, n=5)
    assert [k["prompt"] for k in kept] == train[2:]


def test_tulu3_two_percent_rule_boundary():
    evals = [f"eval question {i}" for i in range(10)]
    train = [f"train question number {i}" for i in range(98)] + ["eval question 1", "eval question 2"]
    assert overlap(train, evals).exact_fraction == 0.02
    assert not overlap(train, evals).should_drop_source()  # more than 2% drops; exactly 2% stays
    assert overlap([*train, "eval question 3"], evals).should_drop_source()


def test_built_in_task_splits_are_clean():
    task = get_task("arithmetic")
    train = [r["prompt"] for r in task.generate("train", 300, 0)]
    test = [r["prompt"] for r in task.generate("test", 100, 0)]
    assert overlap(train, test, fold_punctuation=False).exact_fraction == 0.0
    # folding punctuation conflates symbolic prompts ("3+9=" vs "3*9="): that is why it is optional
    assert overlap(["3+9="], ["3*9="]).exact_fraction == 1.0
    assert overlap(["3+9="], ["3*9="], fold_punctuation=False).exact_fraction == 0.0


def test_short_texts_still_match_and_bad_args_raise():
    assert ngrams("a b", 8) == {("a", "b")}
    with pytest.raises(ValueError, match="non-empty"):
        overlap([], ["x"])
    with pytest.raises(ValueError, match="unit"):
        overlap(["x"], ["x"], unit="token")
