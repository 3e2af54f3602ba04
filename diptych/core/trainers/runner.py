"""Checkpoint and resume wiring shared by every training loop.

A run directory holds ``step_XXXXXXXX/`` checkpoints written by ``backend.save`` (atomic:
temporary name, then rename; the last ``keep_last`` kept). Each carries the metadata a
resume needs: the run config, the trainer step, the data position and the RNG state.

Every diptych loop draws its randomness from ``(seed, step)`` (``batch_iterator`` shuffles
by ``(seed, epoch)``; GRPO/PPO sample with seed ``seed * 100003 + step``), so the trainer
step *is* the data position and the RNG state: resuming at step k replays exactly the
batches and samples an uninterrupted run would have drawn from step k on. Loops run in
segments between save points (``run_segments``), so the loops themselves need no
checkpoint code; a loop that must not stop between save points (the asynchronous GRPO
pipeline) runs once and is handed a ``save`` callback instead (:class:`SavePoints`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from diptych.core import checkpointing as ckpt
from diptych.core.hf import first_nonfinite
from diptych.core.mesh import barrier, on_main_process
from diptych.core.trainers.base import TrainerError

LOCK_FILE = ".diptych.lock"
"""The run lock's file in a run directory; it records the holder (pid, host, start time) as JSON."""
RUN_FILES = ("metrics.jsonl", "curves.png", "tb")
"""What a run writes directly in ``out`` (besides its checkpoint root): cleared by ``overwrite``."""
CHECKPOINT_ROOT_FILES = ("reference", "ref_logprobs.npz")
"""What a run writes in its checkpoint root besides ``step_*``: valid only for that run (its starting policy)."""


class RunLockError(TrainerError):
    """Another live process holds the run directory."""


class RunLock:
    """One owner per run directory: an advisory ``fcntl.flock`` on ``<folder>/.diptych.lock`` held for the run's life.

    Two runs writing one ``out`` replace each other's checkpoints and interleave ``metrics.jsonl``; the second
    one fails here at once, naming the holder. The kernel drops the lock when the holder's process ends
    (``kill -9`` included), so a stale lock file never blocks a later run. Where ``fcntl`` does not exist
    (Windows) the lock is a no-op.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._f: IO[str] | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115  (held open for the run's life)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise RunLockError(f"{self.folder} is in use by another run ({_describe_holder(holder)}); wait for it to "
                               "finish, stop it, or give this run another out.") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        f.flush()
        self._f = f
        return self

    def release(self) -> None:
        if self._f is not None:
            self._f.close()  # closing the file drops the flock
            self._f = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def previous_run(out_dir: Path | None, root: Path | None) -> list[str]:
    """What an earlier run left that a fresh run would clobber: its checkpoints and its metrics.

    In a job of several processes every one looks, then all wait (:func:`diptych.core.mesh.barrier`) before
    any clears anything, so all of them see the same earlier run and take the same path (refuse, or clear).
    """
    found = []
    steps = sorted(p.name for p in root.iterdir() if ckpt.STEP_DIR.match(p.name)) if root and root.is_dir() else []
    if steps:
        found.append(f"{len(steps)} checkpoint(s) in {root} (newest {steps[-1]})")
    metrics = out_dir / "metrics.jsonl" if out_dir is not None else None
    if metrics is not None and metrics.is_file() and metrics.stat().st_size:
        found.append(f"{metrics}")
    barrier()
    return found


def clear_run(out_dir: Path | None, root: Path | None) -> None:
    """Remove an earlier run's checkpoints, references and metrics (``overwrite``), each via a rename first so a
    kill midway leaves nothing that looks like a checkpoint. Process 0 of a multi-process job clears; the
    others wait for it (two ranks removing the same folders would trip over each other)."""
    on_main_process(lambda: _clear_run(out_dir, root))


def _clear_run(out_dir: Path | None, root: Path | None) -> None:
    if root is not None and root.is_dir():
        for p in list(root.iterdir()):
            if ckpt.STEP_DIR.match(p.name) or p.name in CHECKPOINT_ROOT_FILES:
                ckpt.remove_atomically(p)
    if out_dir is not None:
        for name in RUN_FILES:
            p = out_dir / name
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()


def clear_stale_references(root: Path | None) -> None:
    """A run starting at step 0 computes its own reference from its own starting policy: drop any left behind
    (process 0 of a job; the others wait)."""
    def clear() -> None:
        if root is not None and root.is_dir():
            for name in CHECKPOINT_ROOT_FILES:
                if (root / name).exists():
                    ckpt.remove_atomically(root / name)

    on_main_process(clear)


def clean_orphans(root: Path | None) -> list[Path]:
    """Leftovers of killed saves and prunes are removed by a run at start, under its lock: by process 0 of a job
    (the one holding the lock), the others waiting."""
    return on_main_process(lambda: ckpt.clean_orphans(root)) or []


def say(message: str) -> None:
    """A one-line notice on stderr (resume fallbacks, skipped checkpoints)."""
    print(message, file=sys.stderr)

RESUME_MUTABLE = ("steps", "out", "checkpoint", "quiet", "vllm")
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
        """Write the checkpoint of ``step``; a state with a non-finite weight is never saved (a resume from it
        could only skip every step)."""
        bad = first_nonfinite(self.backend.export_weights(state))
        if bad is not None:
            from diptych.core.trainers.base import DivergenceError

            raise DivergenceError(f"refusing to save the step-{step} checkpoint: parameter {bad} is not finite. "
                                  "Lower the learning rate (optim.lr) and resume from the last checkpoint "
                                  "(--resume).", step=step, state=state)
        path = ckpt.step_dir(self.root, step)
        return self.backend.save(state, path, metadata=self.metadata(step, seed, extra), keep_last=self.keep_last)

    def latest(self) -> Path | None:
        return ckpt.latest_checkpoint(self.root)

    def restore_latest(self, **restore_options: Any) -> tuple[Any, dict[str, Any]] | None:
        """``(state, metadata)`` of the newest intact checkpoint, or None when there is none.

        A checkpoint that cannot be read (truncated by a full disk, half-deleted by a killed prune) is skipped,
        saying which and why, and the previous one is tried. A checkpoint of the other backend, one written
        with a different config (other than :data:`RESUME_MUTABLE` keys) or one holding a non-finite weight
        is refused: resuming it would not continue the same run.
        """
        skipped: list[str] = []
        for path in reversed(ckpt.list_checkpoints(self.root)):
            try:
                info = ckpt.read_metadata(path)
            except (ckpt.CheckpointError, ValueError, OSError) as e:
                skipped.append(_skip(path, e))
                continue
            saved = info.get("backend")
            if saved != self.backend.name:
                raise TrainerError(f"{path} is a {saved} checkpoint, and this run uses --backend {self.backend.name}; "
                                   f"resume with --backend {saved}, or convert it first: diptych convert {path} "
                                   f"OUT --to {self.backend.name}.")
            check_same_run((info.get("metadata") or {}).get("config", {}), self.config, path)
            try:
                state, meta = self.backend.restore(path, **restore_options)
            except Exception as e:  # any reader's failure means: not intact, try the previous one
                skipped.append(_skip(path, e))
                continue
            bad = first_nonfinite(self.backend.export_weights(state))
            if bad is not None:
                raise TrainerError(f"{path} holds a non-finite weight (parameter {bad}); training cannot continue "
                                   "from it. Delete it to resume from an earlier checkpoint, or start over.")
            if skipped:
                say(f"resume: from {path.name}, the newest intact checkpoint.")
            return state, meta
        if skipped:
            raise TrainerError(f"No intact checkpoint under {self.root} to resume from (all {len(skipped)} skipped); "
                               "start over with --overwrite instead of --resume.")
        return None

    def save_points(self, start: int, total: int) -> list[int]:
        """Steps after which to save: every ``every`` steps, and always the last step."""
        points = list(range(start - start % self.every + self.every, total, self.every)) if self.every else []
        return [p for p in points if p > start] + [total]


def _skip(path: Path, error: BaseException) -> str:
    lines = str(error).strip().splitlines() or [""]
    reason = f"{type(error).__name__}: {lines[0][:200]}"
    say(f"resume: skipping {path.name}, it cannot be read ({reason}); trying the previous checkpoint.")
    return f"{path.name} ({reason})"


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


class SavePoints:
    """The save points of a run for a loop that saves from inside itself (``run_segments(..., saves_inside=True)``).

    An asynchronous pipeline must not drain and restart at every checkpoint (its generator would start again
    and a dead one could go unnoticed between segments), so it runs once for the whole run and calls
    ``save(step, state)`` after every step; :meth:`due` says whether ``step`` is a save point, so a loop whose
    state is costly to reach (a Ray actor's) fetches it only there. The last step is saved by ``run_segments``
    after the loop returns, as for segmented loops, so a loop that ends with an error leaves the previous one.
    """

    def __init__(self, checkpointer: Checkpointer | None, points: list[int], seed: int,
                 extra: dict[str, Any] | None = None) -> None:
        self.checkpointer, self.points, self.seed, self.extra = checkpointer, frozenset(points), seed, extra

    def due(self, step: int) -> bool:
        return self.checkpointer is not None and step in self.points

    def __call__(self, step: int, state: Any) -> None:
        if self.due(step):
            self.checkpointer.save(step, state, self.seed, self.extra)  # type: ignore[union-attr]


def run_segments(loop: Callable[..., Any], state: Any, start: int, total: int,
                 checkpointer: Checkpointer | None, seed: int, extra: dict[str, Any] | None = None,
                 saves_inside: bool = False) -> Any:
    """Run ``loop(state, from_step, to_step)`` between save points, saving after each segment.

    ``loop`` must run trainer steps ``from_step .. to_step - 1`` (every diptych ``train_*``
    does, given ``start_step=from_step`` and ``steps=to_step``). With ``saves_inside`` the loop runs once,
    ``loop(state, start, total, save)``, and saves the intermediate points itself through ``save``
    (:class:`SavePoints`); the final checkpoint is written here either way.
    """
    if start >= total:
        return state
    points = checkpointer.save_points(start, total) if checkpointer else [total]
    if saves_inside:
        state = loop(state, start, total, SavePoints(checkpointer, points[:-1], seed, extra))
        if checkpointer is not None:
            checkpointer.save(total, state, seed, extra)
        return state
    for end in points:
        state = loop(state, start, end)
        if checkpointer is not None:
            checkpointer.save(end, state, seed, extra)
        start = end
    return state


def with_steps(cfg: Any, steps: int) -> Any:
    """A copy of a trainer config running to ``steps`` (the segment end)."""
    return dataclasses.replace(cfg, steps=steps)
