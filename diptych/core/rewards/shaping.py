"""Shape rewards: R1 output format, DAPO's soft overlong penalty, and length control against a budget.

Lengths are counted in tokens, never characters (Tunix's overlong penalty counted characters: a
bug). They come from a ``completion_lengths`` or ``completion_ids`` column, which the trainer has
anyway, or from a tokenizer given to the reward.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from diptych.core.rewards.base import register_reward


class FormatReward:
    """1.0 for exactly one ``<think>...</think>`` followed by a non-empty answer, else 0.0.

    With ``answer_tags`` the answer must be exactly one ``<answer>...</answer>`` and nothing but
    whitespace may follow it. ``think_in_prompt=True`` is for templates whose prompt already
    opens the think block: the completion then holds only the closing tag.
    """

    name = "format"

    def __init__(self, think_tags: Sequence[str] = ("<think>", "</think>"), answer_tags: Sequence[str] | None = None,
                 think_in_prompt: bool = False) -> None:
        self.open, self.close = think_tags
        self.answer_tags = tuple(answer_tags) if answer_tags else None
        self.think_in_prompt = think_in_prompt

    def score(self, completion: str) -> float:
        o, c = self.open, self.close
        if completion.count(c) != 1 or completion.count(o) != (0 if self.think_in_prompt else 1):
            return 0.0
        head, answer = completion.split(c)
        if not self.think_in_prompt and not head.lstrip().startswith(o):
            return 0.0
        if not head.replace(o, "").strip():
            return 0.0  # an empty think block is not reasoning
        if self.answer_tags is None:
            return 1.0 if answer.strip() else 0.0
        ao, ac = self.answer_tags
        m = re.fullmatch(rf"\s*{re.escape(ao)}(.*?){re.escape(ac)}\s*", answer, flags=re.DOTALL)
        return 1.0 if m and m.group(1).strip() and ao not in m.group(1) else 0.0

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        return [self.score(c) for c in completions]


def token_lengths(completions: Sequence[str], columns: dict[str, Any], tokenizer: Any, who: str) -> list[int]:
    """Token counts from ``completion_lengths``, else ``completion_ids``, else the tokenizer."""
    if "completion_lengths" in columns:
        return [int(x) for x in columns["completion_lengths"]]
    if "completion_ids" in columns:
        return [len(ids) for ids in columns["completion_ids"]]
    if tokenizer is not None:
        return [len(tokenizer.encode(c)) for c in completions]
    raise ValueError(f"{who} counts tokens: pass a 'completion_lengths' or 'completion_ids' column, "
                     "or build the reward with tokenizer=...")


class OverlongPenalty:
    """DAPO soft overlong punishment: 0 up to ``max_length - buffer`` tokens, then linear to ``-penalty``.

    Beyond ``max_length`` the value stays at ``-penalty`` (the sample was truncated).
    """

    name = "overlong"

    def __init__(self, max_length: int = 512, buffer: int = 128, penalty: float = 1.0, tokenizer: Any = None) -> None:
        if not 0 < buffer <= max_length:
            raise ValueError(f"overlong needs 0 < buffer <= max_length, got buffer={buffer}, max_length={max_length}.")
        self.max_length, self.buffer, self.penalty, self.tokenizer = max_length, buffer, float(penalty), tokenizer

    def value(self, length: int) -> float:
        start = self.max_length - self.buffer
        if length <= start:
            return 0.0
        if length > self.max_length:
            return -self.penalty
        return (start - length) / self.buffer * self.penalty

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        return [self.value(n) for n in token_lengths(completions, columns, self.tokenizer, "overlong")]


class LengthReward:
    """Length control for token budgets (L1-style): ``-alpha * |n - budget| / budget``, floored at ``-alpha``.

    ``mode="max"`` only punishes going over the budget. The budget is ``budget=`` or a per-row
    ``budget`` column (which wins when present; None there means "no budget": not applicable).
    """

    name = "length"

    def __init__(self, budget: int | None = None, alpha: float = 1.0, mode: str = "exact",
                 budget_column: str = "budget", tokenizer: Any = None) -> None:
        if mode not in ("exact", "max"):
            raise ValueError(f"length mode must be 'exact' or 'max', got {mode!r}.")
        if budget is not None and budget <= 0:
            raise ValueError(f"length budget must be positive, got {budget}.")
        self.budget, self.alpha, self.mode, self.budget_column, self.tokenizer = budget, alpha, mode, budget_column, \
            tokenizer

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float | None]:
        budgets = columns.get(self.budget_column, [self.budget] * len(completions))
        if self.budget is None and self.budget_column not in columns:
            raise ValueError(f"length reward needs budget=... or a {self.budget_column!r} column.")
        out: list[float | None] = []
        for n, b in zip(token_lengths(completions, columns, self.tokenizer, "length"), budgets):
            if b is None:
                out.append(None)
                continue
            gap = n - int(b) if self.mode == "max" else abs(n - int(b))
            out.append(-self.alpha * min(1.0, max(0, gap) / int(b)))
        return out


register_reward("format")(FormatReward)
register_reward("overlong")(OverlongPenalty)
register_reward("length")(LengthReward)
