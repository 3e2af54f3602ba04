"""Datasets, padding, packing and the resumable loader, including the bad inputs users actually have."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diptych.core.data import (
    DataError,
    DataLoader,
    PreferenceDataset,
    PromptDataset,
    SFTDataset,
    pack,
    pad_batch,
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


def test_pad_batch_left_and_right():
    tokens, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    np.testing.assert_array_equal(tokens, [[5, 6, 7], [0, 0, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    tokens, mask = pad_batch([[5, 6, 7], [8]], pad_id=9, side="right", max_len=4)
    np.testing.assert_array_equal(tokens, [[5, 6, 7, 9], [8, 9, 9, 9]])
    assert tokens.dtype == np.int32 and mask.sum() == 4
    # positions convention: cumsum(mask) - 1 clipped at 0 starts each left-padded prompt at 0
    _, m = pad_batch([[1, 2], [3]], 0)
    np.testing.assert_array_equal(np.clip(np.cumsum(m, 1) - 1, 0, None), [[0, 1], [0, 0]])
    with pytest.raises(ValueError, match="max_len"):
        pad_batch([[1, 2, 3]], 0, max_len=2)
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], 0, side="middle")


def test_pack_segments_positions_and_aligned_masks():
    seqs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    tokens, seg, pos, masks = pack(seqs, max_len=5, aligned=[[0, 1, 1], [1, 1], [0, 0, 1, 1], [1]])
    # every token appears exactly once, with its segment's positions restarting at 0
    assert sorted(tokens[seg > 0].tolist()) == list(range(1, 11))
    for row in range(tokens.shape[0]):
        for s in set(seg[row].tolist()) - {0}:
            sel = seg[row] == s
            toks = tokens[row, sel].tolist()
            assert toks in seqs and pos[row, sel].tolist() == list(range(len(toks)))
    assert tokens.shape == (2, 5) and (tokens[seg == 0] == 0).all()
    assert masks.sum() == 7
    with pytest.raises(ValueError, match="truncate"):
        pack([[1] * 6], max_len=5)


def test_loader_is_seeded_and_covers_each_epoch_once():
    ds = PromptDataset(ROWS)
    a = DataLoader(ds, batch_size=3, seed=1, num_epochs=2)
    batches = list(a)
    assert [len(b) for b in batches] == [3, 3, 3, 1] * 2 and len(a) == 4
    first = [r["prompt"] for b in batches[:4] for r in b]
    assert sorted(first) == sorted(r["prompt"] for r in ROWS)
    assert first != [r["prompt"] for b in batches[4:] for r in b]  # reshuffled per epoch
    assert [r["prompt"] for b in DataLoader(ds, 3, seed=1, num_epochs=2) for r in b] == \
        [r["prompt"] for b in batches for r in b]
    assert [len(b) for b in DataLoader(ds, 3, drop_last=True, num_epochs=1)] == [3, 3, 3]


def test_loader_resumes_exactly_from_its_state():
    ds = PromptDataset(ROWS)
    ref = DataLoader(ds, batch_size=4, seed=7, collate=to_columns)
    want = [next(ref)["prompt"] for _ in range(7)]
    run = DataLoader(ds, batch_size=4, seed=7, collate=to_columns)
    got = [next(run)["prompt"] for _ in range(3)]
    state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint round trip
    resumed = DataLoader(ds, batch_size=4, seed=7, collate=to_columns)
    resumed.load_state_dict(state)
    got += [next(resumed)["prompt"] for _ in range(4)]
    assert got == want
    with pytest.raises(DataError, match="same data"):
        DataLoader(ds, batch_size=4, seed=8).load_state_dict(state)
    with pytest.raises(DataError, match="empty"):
        DataLoader([], batch_size=1)
