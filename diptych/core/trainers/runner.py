"""Checkpoint and resume wiring shared by every training loop.

A run directory holds ``step_XXXXXXXX/`` checkpoints written by ``backend.save`` (atomic:
temporary name, then rename; the last ``keep_last`` kept). Each carries the metadata a
resume needs: the run config, the trainer step, the data position and the RNG state.

Every diptych loop draws its randomness from ``(seed, step)`` (``batch_iterator`` shuffles
by ``(seed, epoch)``; GRPO/PPO sample with seed ``seed * 100003 + step``), so the trainer
step *is* the data position and the RNG state: resuming at step k replays exactly the
batches and samples an uninterrupted run would have drawn from step k on. Loops run in
segments between save points (``run_segments``), so the loops themselves need no
checkpoint code.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diptych.core import checkpointing as ckpt
from diptych.core.trainers.base import TrainerError

RESUME_MUTABLE = ("steps", "out", "checkpoint", "quiet")
"""Config keys a resumed run may change (extend the run, move outputs); anything else must match."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every N trainer steps (0: only at the end of the run)."""
    keep_last: int = 3
    dir: str | None = None
    """Default: ``<out>/checkpoints``."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise TrainerError(f"checkpoint.every must be >= 0, got {self.every}.")
        if self.keep_last < 1:
            raise TrainerError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}.")


class Checkpointer:
    """Save a train state with its run metadata every ``every`` steps, keep the last K, resume from the latest."""

    def __init__(self, backend: Any, root: str | Path, config: Any, every: int = 0, keep_last: int = 3) -> None:
        self.backend = backend
        self.root = Path(root)
        self.config = ckpt.to_jsonable(config)
        self.every = int(every)
        self.keep_last = int(keep_last)

    def metadata(self, step: int, seed: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "config": self.config,
            "step": int(step),
            "data_position": {"batch_index": int(step), "seed": int(seed)},
            "rng": {"kind": "seed-and-step", "seed": int(seed), "step": int(step)},
            **(extra or {}),
        }

    def save(self, step: int, state: Any, seed: int, extra: dict[str, Any] | None = None) -> Path:
        path = ckpt.step_dir(self.root, step)
        return self.backend.save(state, path, metadata=self.metadata(step, seed, extra), keep_last=self.keep_last)

    def latest(self) -> Path | None:
        return ckpt.latest_checkpoint(self.root)

    def restore_latest(self) -> tuple[Any, dict[str, Any]] | None:
        """``(state, metadata)`` of the newest complete checkpoint, or None when there is none.

        A checkpoint written with a different config (other than :data:`RESUME_MUTABLE` keys)
        is refused: resuming it would not continue the same run.
        """
        path = self.latest()
        if path is None:
            return None
        state, meta = self.backend.restore(path)
        check_same_run(meta.get("config", {}), self.config, path)
        return state, meta

    def save_points(self, start: int, total: int) -> list[int]:
        """Steps after which to save: every ``every`` steps, and always the last step."""
        points = list(range(start - start % self.every + self.every, total, self.every)) if self.every else []
        return [p for p in points if p > start] + [total]


def check_same_run(saved: dict[str, Any], current: dict[str, Any], where: Path | str) -> None:
    diffs = [k for k in sorted(set(saved) | set(current))
             if k not in RESUME_MUTABLE and _strip(saved.get(k)) != _strip(current.get(k))]
    if diffs:
        shown = "; ".join(f"{k}: checkpoint {json.dumps(saved.get(k))[:80]} vs now {json.dumps(current.get(k))[:80]}"
                          for k in diffs[:3])
        raise TrainerError(f"{where} was written by a run with a different config ({shown}). Resume with the same "
                           "config, or start a fresh run in another output directory.")


def _strip(section: Any) -> Any:
    """Nested mutable keys (e.g. ``grpo.steps``) may change too."""
    if isinstance(section, dict):
        return {k: _strip(v) for k, v in section.items() if k not in RESUME_MUTABLE}
    return section


def run_segments(loop: Callable[[Any, int, int], Any], state: Any, start: int, total: int,
                 checkpointer: Checkpointer | None, seed: int, extra: dict[str, Any] | None = None) -> Any:
    """Run ``loop(state, from_step, to_step)`` between save points, saving after each segment.

    ``loop`` must run trainer steps ``from_step .. to_step - 1`` (every diptych ``train_*``
    does, given ``start_step=from_step`` and ``steps=to_step``).
    """
    if start >= total:
        return state
    points = checkpointer.save_points(start, total) if checkpointer else [total]
    for end in points:
        state = loop(state, start, end)
        if checkpointer is not None:
            checkpointer.save(end, state, seed, extra)
        start = end
    return state


def with_steps(cfg: Any, steps: int) -> Any:
    """A copy of a trainer config running to ``steps`` (the segment end)."""
    return dataclasses.replace(cfg, steps=steps)
