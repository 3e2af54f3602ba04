"""The ``async:`` block of the GRPO config (written ``async`` in YAML and flags, ``async_`` in Python)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AsyncConfig:
    """Off by default: GRPO runs synchronously (generate, score, train, in turn)."""

    enabled: bool = False
    max_staleness: int = 1
    """How many optimizer steps old a token's policy version may be when it is trained on."""

    def __post_init__(self) -> None:
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}.")
