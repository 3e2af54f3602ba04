"""The pretraining recipe end to end, shrunk to a few steps (the real run is in the README)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diptych.recipes.recurrent_pretrain import CharCodec, RecipeConfig, _encode, run
from tests.conftest import needs_torch


def test_dense_targets_are_running_sums_and_the_answer():
    codec = CharCodec("sum =0123456789")
    rows = [{"prompt": "sum 385=", "answer": "6", "digits": [3, 8, 5]}, {"prompt": "sum 19=", "answer": "0",
                                                                         "digits": [1, 9]}]
    tokens, mask, targets, weights, answers = _encode(codec, rows, dense=True)
    inv = {v: k for k, v in codec.index.items()}
    assert [inv[t] for t, w in zip(targets[0], weights[0]) if w] == ["3", "1", "6", "6"]
    assert [inv[t] for t, w in zip(targets[1], weights[1]) if w] == ["1", "0", "0"]
    assert mask[1, 0] == 0 and tokens[1, 0] == 0 and np.array_equal(answers, [codec.index["6"], codec.index["0"]])
    only = _encode(codec, rows, dense=False)[3]
    assert only.sum() == 2 and only[:, -1].all()


@pytest.mark.slow
@needs_torch
def test_recipe_runs_end_to_end_and_writes_results(tmp_path):
    cfg = RecipeConfig(steps=4, batch=8, eval_size=8, eval_depths=(1, 2), out=str(tmp_path / "run"))
    results = run(cfg, log=lambda *_: None)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["params"] == results["params"] and {"sweep", "sweep_long", "baseline"} <= set(saved)
    assert (tmp_path / "run" / "checkpoint" / "diptych_codec.json").is_file()
    assert (tmp_path / "run" / "sweep.png").is_file()


def test_cli_length_flags_parse_and_reject_bad_ranges():
    import argparse

    from diptych.recipes.recurrent_pretrain import _ints, _pair

    assert _pair("4,12") == (4, 12) and _ints("1,2,4") == (1, 2, 4)
    for bad in ("12,4", "0,3", "4", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected"):
            _pair(bad)


def test_word_problem_targets_are_prefix_products():
    from diptych.core.tasks.word_problem import compose
    from diptych.recipes.recurrent_pretrain import TASKS

    codec = CharCodec(TASKS["word_problem"]["chars"])
    row = {"prompt": "mul 4355=", "answer": "0", "factors": [4, 3, 5, 5], "trace": [4, 0, 5, 0]}
    assert compose(compose(compose(4, 3), 5), 5) == 0  # the row is consistent with the group law
    _, mask, targets, weights, _ = _encode(codec, [row, {**row, "prompt": "mul 43=", "factors": [4, 3],
                                                                    "trace": [4, 0], "answer": "0"}], dense=True)
    inv = {v: k for k, v in codec.index.items()}
    assert [inv[t] for t, w in zip(targets[0], weights[0]) if w] == ["4", "0", "5", "0", "0"]
    assert [inv[t] for t, w in zip(targets[1], weights[1]) if w] == ["4", "0", "0"]  # left padding shifts labels
    assert weights[1, :2].sum() == 0 and mask[1, :2].sum() == 0


def test_perm_chain_targets_sit_where_each_table_ends():
    from diptych.recipes.recurrent_pretrain import TASKS

    codec = CharCodec(TASKS["perm_chain"]["chars"])
    row = {"prompt": "3:DHKTV,EGMSU=", "answer": "0", "trace": [4, 0]}
    tokens, _, targets, weights, _ = _encode(codec, [row], dense=True)
    inv = {v: k for k, v in codec.index.items()}
    assert [(inv[int(tokens[0, i])], inv[int(targets[0, i])]) for i in np.flatnonzero(weights[0])] == [
        (",", "4"), ("=", "0")]
