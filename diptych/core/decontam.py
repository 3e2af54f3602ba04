"""Decontamination: how much of a training source overlaps the evaluation prompts.

Tulu 3 drops a whole training source when more than 2% of its prompts exactly match an eval
prompt, and uses n-gram overlap to catch paraphrase-level leaks. Both measures are here, on
normalised text (case, whitespace and punctuation folded), with the overlapping indices so a
caller can drop individual rows instead of whole sources.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Literal

TULU3_EXACT_THRESHOLD = 0.02


def normalise(text: str, fold_punctuation: bool = True) -> str:
    """Fold case, Unicode compatibility forms, runs of whitespace and (optionally) punctuation.

    Keep punctuation (``fold_punctuation=False``) for symbolic prompts: "3+9=" and "3*9=" differ.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    if fold_punctuation:
        text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def ngrams(text: str, n: int, unit: Literal["word", "char"] = "word",
           fold_punctuation: bool = True) -> set[tuple[str, ...]]:
    """All n-grams of the normalised text; a text shorter than n is one gram (so it can still match)."""
    norm = normalise(text, fold_punctuation)
    items: Sequence[str] = norm.split() if unit == "word" else list(norm)
    if not items:
        return set()
    if len(items) < n:
        return {tuple(items)}
    return {tuple(items[i: i + n]) for i in range(len(items) - n + 1)}


@dataclasses.dataclass
class OverlapReport:
    """Fractions of training prompts that overlap the eval set, and which ones."""

    num_train: int
    num_eval: int
    exact_fraction: float
    ngram_fraction: float
    exact_indices: list[int]
    ngram_indices: list[int]
    n: int

    def should_drop_source(self, threshold: float = TULU3_EXACT_THRESHOLD) -> bool:
        """Tulu 3's rule: a source with more than ``threshold`` exact overlap is dropped."""
        return self.exact_fraction > threshold

    def summary(self) -> str:
        return (f"{len(self.exact_indices)}/{self.num_train} train prompts ({self.exact_fraction:.2%}) exactly match "
                f"the {self.num_eval} eval prompts; {len(self.ngram_indices)} ({self.ngram_fraction:.2%}) share a "
                f"{self.n}-gram.")


def overlap(train: Iterable[str], eval_prompts: Iterable[str], n: int = 8, unit: Literal["word", "char"] = "word",
            min_ngram_overlap: float = 0.0, fold_punctuation: bool = True) -> OverlapReport:
    """Exact and n-gram overlap of ``train`` prompts with ``eval_prompts``.

    A training prompt counts as n-gram-overlapping when more than ``min_ngram_overlap`` of its
    n-grams (0.0: any one) occur in the eval set.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    if unit not in ("word", "char"):
        raise ValueError(f"unit must be 'word' or 'char', got {unit!r}.")
    train, eval_prompts = list(train), list(eval_prompts)
    if not train or not eval_prompts:
        raise ValueError(f"overlap needs non-empty prompt lists, got {len(train)} train and {len(eval_prompts)} eval.")
    eval_exact = {normalise(p, fold_punctuation) for p in eval_prompts}
    eval_grams: set[tuple[str, ...]] = set()
    for p in eval_prompts:
        eval_grams |= ngrams(p, n, unit, fold_punctuation)
    exact, gram = [], []
    for i, p in enumerate(train):
        if normalise(p, fold_punctuation) in eval_exact:
            exact.append(i)
        g = ngrams(p, n, unit, fold_punctuation)
        if g and len(g & eval_grams) / len(g) > min_ngram_overlap:
            gram.append(i)
    return OverlapReport(len(train), len(eval_prompts), len(exact) / len(train), len(gram) / len(train), exact,
                         gram, n)


def decontaminate(train_rows: Sequence[dict], eval_prompts: Iterable[str], prompt_column: str = "prompt",
                  n: int = 8, use_ngrams: bool = True, fold_punctuation: bool = True
                  ) -> tuple[list[dict], OverlapReport]:
    """Rows whose prompt overlaps no eval prompt (exact, and by n-gram when ``use_ngrams``), plus the report."""
    report = overlap([str(r[prompt_column]) for r in train_rows], eval_prompts, n=n,
                     fold_punctuation=fold_punctuation)
    drop = set(report.exact_indices) | (set(report.ngram_indices) if use_ngrams else set())
    return [r for i, r in enumerate(train_rows) if i not in drop], report
