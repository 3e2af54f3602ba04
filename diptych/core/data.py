"""Datasets for RL prompts, preference pairs and SFT: reading and validating rows.

Everything is offline and framework-free: rows are plain dicts read from JSONL, JSON, Parquet,
in-memory lists or a ``datasets.Dataset``. Batching is the trainers' one pipeline
(``diptych.core.trainers.base``: ``batch_iterator`` for the seeded, resumable order and
``pack_sequences`` / ``rollout_batch`` for fixed-width arrays).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

Row = dict[str, Any]


class DataError(ValueError):
    """A dataset that cannot be used as given, with where and how to fix it."""


# ----------------------------------------------------------------------------- reading


def read_jsonl(path: str | Path) -> list[Row]:
    """One JSON object per line; blank lines are skipped; a bad line names the file and line number."""
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode_line(raw, path, lineno)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                                "each line must be one JSON object.") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}.")
            rows.append(row)
    return rows


def _decode_line(raw: bytes, path: str | Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: byte 0x{raw[e.start]:02x} at column {e.start + 1} is not valid UTF-8; "
                        "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None


def _read_text(path: Path) -> str:
    """The whole file as UTF-8, or an error naming the line and column of the first bad byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{lineno}: byte 0x{raw[e.start]:02x} at column {column} is not valid UTF-8; "
                        "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None


def read_rows(source: str | Path | Sequence[Mapping[str, Any]] | Any) -> tuple[list[Row], str]:
    """Rows and a description of where they came from (used in error messages)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"dataset file {path} does not exist.")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return read_jsonl(path), str(path)
        if suffix == ".json":
            try:
                data = json.loads(_read_text(path))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}).") from None
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise DataError(f"{path}: a .json dataset must be a list of objects; use .jsonl for one per line.")
            return data, str(path)
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as e:
                raise ImportError("reading Parquet needs pyarrow: pip install 'diptych[data]'.") from e
            return pq.read_table(path).to_pylist(), str(path)
        raise DataError(f"{path}: unsupported dataset format {suffix!r}; use .jsonl, .json or .parquet.")
    if hasattr(source, "column_names") and hasattr(source, "to_list"):  # a datasets.Dataset, duck-typed
        return list(source.to_list()), f"{type(source).__name__}({len(source)} rows)"
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        rows = list(source)
        for i, r in enumerate(rows):
            if not isinstance(r, Mapping):
                raise DataError(f"row {i} of the in-memory dataset is a {type(r).__name__}, not a dict.")
        return [dict(r) for r in rows], "in-memory list"
    raise DataError(f"cannot read a dataset from {type(source).__name__}; give a path, a list of dicts "
                    "or a datasets.Dataset.")


def _require(rows: list[Row], columns: Sequence[str], where: str) -> None:
    if not rows:
        raise DataError(f"{where} is empty: a dataset needs at least one row.")
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise DataError(f"{where}: row {i} has no column(s) {missing} (it has {sorted(row)}); "
                            "rename the columns or pass the *_column arguments.")


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, Mapping) and "role" in m for m in value)


class _Rows(Sequence[Row]):
    rows: list[Row]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Row:  # type: ignore[override]
        return self.rows[i]

    def columns(self) -> dict[str, list[Any]]:
        return to_columns(self.rows)


def to_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Rows to ``{column: values}``: the ``**columns`` a reward receives."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


# ----------------------------------------------------------------------------- datasets


class PromptDataset(_Rows):
    """Prompts for RL; other columns ride along (answers, tests) for the rewards.

    A prompt may be a string or a list of chat messages; with a ``tokenizer`` message prompts are
    rendered with its chat template (generation prompt added) and the messages are kept in ``messages``.
    """

    def __init__(self, source: Any, prompt_column: str = "prompt", tokenizer: Any = None) -> None:
        rows, where = read_rows(source)
        _require(rows, [prompt_column], where)
        self.rows = []
        for i, r in enumerate(rows):
            p = r[prompt_column]
            if _is_messages(p):
                if tokenizer is None:
                    raise DataError(f"{where}: row {i} has a chat-message prompt; pass tokenizer= to render it.")
                r = {**r, "messages": p, "prompt": tokenizer.apply_chat_template(p, add_generation_prompt=True)}
            elif not isinstance(p, str):
                raise DataError(f"{where}: row {i} column {prompt_column!r} must be a string or chat messages, "
                                f"got {type(p).__name__}.")
            else:
                r = {**r, "prompt": p}
            self.rows.append(r)


class PreferenceDataset(_Rows):
    """(prompt, chosen, rejected) rows for DPO-family training.

    A row whose chosen equals its rejected teaches nothing and usually means a broken pipeline:
    it is warned about, counted in ``num_identical`` and dropped (``drop_identical=False`` keeps it).
    """

    def __init__(self, source: Any, prompt_column: str = "prompt", chosen_column: str = "chosen",
                 rejected_column: str = "rejected", drop_identical: bool = True) -> None:
        rows, where = read_rows(source)
        _require(rows, [prompt_column, chosen_column, rejected_column], where)
        identical = [i for i, r in enumerate(rows) if r[chosen_column] == r[rejected_column]]
        self.num_identical = len(identical)
        if identical:
            warnings.warn(f"{where}: {len(identical)} preference row(s) have identical chosen and rejected "
                          f"(first: row {identical[0]}); {'dropped' if drop_identical else 'kept'}.", stacklevel=2)
        skip = set(identical) if drop_identical else set()
        self.rows = [{**r, "prompt": r[prompt_column], "chosen": r[chosen_column], "rejected": r[rejected_column]}
                     for i, r in enumerate(rows) if i not in skip]
        if not self.rows:
            raise DataError(f"{where}: no usable preference rows left after dropping identical pairs.")

    def tokenize(self, tokenizer: Any, max_length: int | None = None) -> list[dict[str, list[int]]]:
        """Prompt ids and chosen / rejected completion ids (each ended by EOS), truncated to ``max_length``."""
        out = []
        for r in self.rows:
            prompt = _encode_prompt(tokenizer, r["prompt"])
            item = {"prompt_ids": prompt}
            for key in ("chosen", "rejected"):
                ids = [*tokenizer.encode(_text(r[key])), tokenizer.eos_id]
                item[f"{key}_ids"] = ids if max_length is None else ids[: max(0, max_length - len(prompt))]
            out.append(item)
        return out


def _text(value: Any) -> str:
    if _is_messages(value):  # conversational chosen/rejected: the assistant reply is the last message
        return str(value[-1].get("content", ""))
    return str(value)


def _encode_prompt(tokenizer: Any, prompt: Any) -> list[int]:
    if _is_messages(prompt):
        prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    return tokenizer.encode(prompt)


class SFTDataset(_Rows):
    """Supervised rows: ``messages`` (chat) or ``prompt`` + ``completion``; the loss covers responses only."""

    def __init__(self, source: Any, messages_column: str = "messages", prompt_column: str = "prompt",
                 completion_column: str = "completion") -> None:
        rows, where = read_rows(source)
        if not rows:
            raise DataError(f"{where} is empty: a dataset needs at least one row.")
        self.kind: Literal["messages", "prompt_completion"]
        if messages_column in rows[0]:
            self.kind = "messages"
            _require(rows, [messages_column], where)
            for i, r in enumerate(rows):
                if not _is_messages(r[messages_column]) or not any(m["role"] == "assistant"
                                                                   for m in r[messages_column]):
                    raise DataError(f"{where}: row {i} {messages_column!r} must be chat messages with at least "
                                    "one assistant turn.")
            self.rows = [{**r, "messages": r[messages_column]} for r in rows]
        else:
            self.kind = "prompt_completion"
            _require(rows, [prompt_column, completion_column], where)
            self.rows = [{**r, "prompt": r[prompt_column], "completion": r[completion_column]} for r in rows]

    def tokenize(self, tokenizer: Any, max_length: int | None = None, add_bos: bool = False
                 ) -> list[dict[str, list[int]]]:
        """``input_ids`` and ``loss_mask`` (1 on response tokens and their EOS), truncated to ``max_length``.

        Chat rows are rendered turn by turn and each segment encoded separately, so the mask
        boundaries are exact; tokenizers that merge across a boundary may differ slightly from
        encoding the whole text at once.
        """
        out = []
        for r in self.rows:
            ids: list[int] = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
            mask: list[int] = [0] * len(ids)
            if self.kind == "prompt_completion":
                p = _encode_prompt(tokenizer, r["prompt"])
                c = [*tokenizer.encode(_text(r["completion"])), tokenizer.eos_id]
                ids += p + c
                mask += [0] * len(p) + [1] * len(c)
            else:
                msgs = r["messages"]
                done = ""
                for i, m in enumerate(msgs):
                    if m["role"] == "assistant":
                        before = tokenizer.apply_chat_template(msgs[:i], add_generation_prompt=True) if i else ""
                        through = tokenizer.apply_chat_template(msgs[: i + 1], add_generation_prompt=False)
                        if not before.startswith(done) or not through.startswith(before):
                            raise DataError("the chat template does not render conversations as growing prefixes; "
                                            "SFT masking needs that (use prompt/completion rows instead).")
                        seg_p = tokenizer.encode(before[len(done):])
                        seg_a = tokenizer.encode(through[len(before):])
                        if i == len(msgs) - 1 and (not seg_a or seg_a[-1] != tokenizer.eos_id):
                            seg_a = [*seg_a, tokenizer.eos_id]
                        ids += seg_p + seg_a
                        mask += [0] * len(seg_p) + [1] * len(seg_a)
                        done = through
            if max_length is not None:
                ids, mask = ids[:max_length], mask[:max_length]
            out.append({"input_ids": ids, "loss_mask": mask})
        return out
