"""Datasets (reading and validating rows) and the trainers' batching pipeline, including the bad inputs users
actually have."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diptych.core.data import (
    DataError,
    PreferenceDataset,
    PromptDataset,
    SFTDataset,
    read_rows,
    to_columns,
)
from diptych.core.tokenizer import CharTokenizer

ROWS = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(10)]


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_prompt_dataset_from_jsonl_parquet_list_and_duck_typed_datasets(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    jsonl = _write_jsonl(tmp_path / "p.jsonl", ROWS)
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)

    class FakeHFDataset:  # what the `datasets` library exposes, without installing it
        column_names = ("prompt", "answer")

        def __len__(self):
            return len(ROWS)

        def to_list(self):
            return list(ROWS)

    for source in (jsonl, parquet, ROWS, FakeHFDataset()):
        ds = PromptDataset(source)
        assert len(ds) == 10 and ds[3] == {"prompt": "3+1=", "answer": "4"}
    assert to_columns(ds[:2]) == {"prompt": ["0+1=", "1+1="], "answer": ["1", "2"]}


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b",}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        PromptDataset(path)
    path.write_text('{"prompt": "a"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object"):
        read_rows(path)


def test_missing_column_and_empty_dataset_are_clear(tmp_path):
    with pytest.raises(DataError, match=r"row 1 has no column\(s\) \['prompt'\]"):
        PromptDataset([{"prompt": "a"}, {"question": "b"}])
    with pytest.raises(DataError, match="empty"):
        PromptDataset(_write_jsonl(tmp_path / "e.jsonl", []))
    with pytest.raises(DataError, match="unsupported"):
        PromptDataset(_write_jsonl(tmp_path / "x.csv", ROWS))
    with pytest.raises(FileNotFoundError):
        PromptDataset(tmp_path / "missing.jsonl")
    assert PromptDataset([{"question": "q"}], prompt_column="question")[0]["prompt"] == "q"


def test_chat_prompts_render_with_the_tokenizer():
    msgs = [{"role": "user", "content": "2+2="}]
    ds = PromptDataset([{"prompt": msgs}], tokenizer=CharTokenizer())
    assert ds[0]["prompt"] == "2+2=" and ds[0]["messages"] == msgs
    with pytest.raises(DataError, match="tokenizer"):
        PromptDataset([{"prompt": msgs}])


def test_preference_rows_with_identical_pair_are_warned_counted_and_dropped():
    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad"}, {"prompt": "q", "chosen": "same", "rejected": "same"}]
    with pytest.warns(UserWarning, match="1 preference row"):
        ds = PreferenceDataset(rows)
    assert ds.num_identical == 1 and len(ds) == 1
    with pytest.warns(UserWarning):
        assert len(PreferenceDataset(rows, drop_identical=False)) == 2
    with pytest.raises(DataError, match="rejected"):
        PreferenceDataset([{"prompt": "p", "chosen": "c"}])
    tok = CharTokenizer()
    item = ds.tokenize(tok)[0]
    assert item["prompt_ids"] == tok.encode("p") and item["chosen_ids"] == [*tok.encode("good"), tok.eos_id]


def test_sft_prompt_completion_masks_only_the_completion():
    tok = CharTokenizer()
    (item,) = SFTDataset([{"prompt": "1+2=", "completion": "3"}]).tokenize(tok, add_bos=True)
    assert item["input_ids"] == [tok.bos_id, *tok.encode("1+2=3"), tok.eos_id]
    assert item["loss_mask"] == [0, 0, 0, 0, 0, 1, 1]


def test_sft_messages_mask_every_assistant_turn():
    class Bracket(CharTokenizer):  # a template with visible role markers
        def apply_chat_template(self, messages, add_generation_prompt=True):
            text = "".join(f"{m['role'][0]}:{m['content']};" for m in messages)
            return text + ("a:" if add_generation_prompt else "")

    tok = Bracket()
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "2?"}, {"role": "assistant", "content": "ok"}]
    (item,) = SFTDataset([{"messages": msgs}]).tokenize(tok)
    text = tok.decode(item["input_ids"])
    assert text == "u:hi;a:yo;u:2?;a:ok;"
    masked = "".join(ch for ch, m in zip(text, item["loss_mask"]) if m)
    assert masked == "yo;ok;" and item["loss_mask"][-1] == 1 and item["input_ids"][-1] == tok.eos_id
    with pytest.raises(DataError, match="assistant"):
        SFTDataset([{"messages": [{"role": "user", "content": "x"}]}])


def test_pack_sequences_left_and_right_padding():
    """The trainers' one packer: the target mask covers exactly the completion on either side."""
    from diptych.core.trainers.base import TrainerError, pack_sequences

    left = pack_sequences([[1, 2], [3]], [[7, 8], [9]], width=5, pad_id=0)
    np.testing.assert_array_equal(left["tokens"], [[0, 1, 2, 7, 8], [0, 0, 0, 3, 9]])
    np.testing.assert_array_equal(left["attention_mask"], [[0, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(left["mask"], [[0, 0, 1, 1], [0, 0, 0, 1]])  # mask[t] scores tokens[t + 1]
    right = pack_sequences([[1, 2], [3]], [[7, 8], [9]], width=5, pad_id=0, padding_side="right")
    np.testing.assert_array_equal(right["tokens"], [[1, 2, 7, 8, 0], [3, 9, 0, 0, 0]])
    np.testing.assert_array_equal(right["attention_mask"], [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(right["mask"], [[0, 1, 1, 0], [1, 0, 0, 0]])
    for packed in (left, right):  # each masked target is a completion token
        assert sorted(packed["tokens"][:, 1:][packed["mask"] > 0].tolist()) == [7, 8, 9]
    with pytest.raises(TrainerError, match="does not fit"):
        pack_sequences([[1, 2, 3]], [[4, 5, 6]], width=5, pad_id=0)
    with pytest.raises(TrainerError, match="padding_side"):
        pack_sequences([[1]], [[2]], width=3, pad_id=0, padding_side="middle")


def test_batch_iterator_is_seeded_covers_each_epoch_and_resumes_exactly():
    from diptych.core.trainers.base import TrainerError, batch_iterator

    rows = list(PromptDataset(ROWS))
    it = batch_iterator(rows, 5, seed=1)
    batches = [next(it)[1] for _ in range(4)]
    first, second = [r["prompt"] for b in batches[:2] for r in b], [r["prompt"] for b in batches[2:] for r in b]
    assert sorted(first) == sorted(second) == sorted(r["prompt"] for r in ROWS)  # one epoch = every row once
    assert first != second  # reshuffled per epoch
    resumed = batch_iterator(rows, 5, seed=1, start=3)
    assert next(resumed) == (3, batches[3])  # position k depends only on (seed, k)
    assert [r["prompt"] for r in next(batch_iterator(rows, 5, seed=2))[1]] != first[:5]
    with pytest.raises(TrainerError, match="empty"):
        next(batch_iterator([], 1, seed=0))
