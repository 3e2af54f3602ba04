"""Framework-free checkpoint plumbing: atomic directory writes, keep-last-K, metadata.

A diptych checkpoint is a directory. Both backends write ``diptych.json`` (this module's
metadata: backend, step, model config, optimizer config, and the caller's own metadata,
typically the run config, data position and RNG state) next to their native files. The
directory is written under a temporary name, its files and itself fsync'ed, renamed into place and
the parent fsync'ed, so a run killed mid-save (or a power cut) leaves the previous checkpoint intact
and never a half-written one. Pruning renames a checkpoint to a hidden trash name before deleting
it, so a kill mid-prune never leaves a half-deleted ``step_*``; hidden temporary and trash folders
are never checkpoints and :func:`clean_orphans` removes them (a run does, under its lock, at start).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from diptych.core import fsio
from diptych.core.config import from_dict
from diptych.core.hf import spec_from_config
from diptych.core.optim import OptimConfig

METADATA_FILE = "diptych.json"
FORMAT = "diptych-checkpoint"
VERSION = 1
STEP_DIR = re.compile(r"^step_(\d+)$")
_STEP_DIR = STEP_DIR  # the old private name
ORPHAN_TAGS = (".tmp-", ".trash-", ".old-")
"""What a hidden leftover's name carries: an unfinished save (``fsio.atomic_dir``), a prune or a replace."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or of an unknown format."""


def step_dir(root: str | os.PathLike, step: int) -> Path:
    """The conventional name of the checkpoint of ``step`` under a run's checkpoint ``root``."""
    return Path(root) / f"step_{int(step):08d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete ``step_*`` checkpoints under ``root``, oldest first (temporary and trash dirs are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / METADATA_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root`` (what ``--resume`` should load), or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` ``step_*`` checkpoints under ``root``; return the deleted.

    Each goes by :func:`remove_atomically`: a kill mid-prune leaves a trash folder, never a half-deleted
    checkpoint that ``list_checkpoints`` (and so ``--resume``) would take for a complete one.
    """
    if keep_last < 1:
        raise CheckpointError(f"keep_last must be >= 1, got {keep_last}.")
    doomed = list_checkpoints(root)[:-keep_last]
    for p in doomed:
        remove_atomically(p)
    return doomed


def remove_atomically(path: str | os.PathLike) -> None:
    """Rename ``path`` to a hidden trash name (one atomic step, fsync'ed), then delete it."""
    path = Path(path)
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    fsync_dir(path.parent)
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def clean_orphans(root: str | os.PathLike | None) -> list[Path]:
    """Remove the hidden leftovers (``.NAME.tmp-*``, ``.NAME.trash-*``, ``.NAME.old-*``) of killed saves and
    prunes under ``root``; return them. Only safe while holding the run lock: a live save is such a folder."""
    removed: list[Path] = []
    if root is None or not Path(root).is_dir():
        return removed
    for p in sorted(Path(root).iterdir()):
        if p.name.startswith(".") and any(tag in p.name for tag in ORPHAN_TAGS):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a folder's entries (a rename into it, a new file) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems without directory fsync
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under ``folder``, then every folder (deepest first), ``folder`` itself last."""
    folder = Path(folder)
    dirs = [folder]
    for p in folder.rglob("*"):
        if p.is_dir() and not p.is_symlink():
            dirs.append(p)
        elif p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(d)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """:func:`diptych.core.fsio.atomic_dir` made durable: the temporary folder's files and folders are fsync'ed
    before the rename and the parent after it, so a power cut cannot leave a renamed but empty checkpoint."""
    with fsio.atomic_dir(path) as tmp:
        yield tmp
        fsync_tree(tmp)
    fsync_dir(Path(path).parent)


@contextlib.contextmanager
def job_atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """:func:`atomic_dir` for a job of several processes that each write their part (a multi-host Orbax save):
    process 0 makes the temporary folder (a name every process derives alike) and renames it into place once
    every process has written, so a killed save never replaces the last good checkpoint. One process: the
    plain :func:`atomic_dir`."""
    from diptych.core.mesh import barrier, is_main_process, process_count

    if process_count() <= 1:
        with atomic_dir(path) as tmp:
            yield tmp
        return
    dest = Path(path)
    tmp = dest.with_name(f".{dest.name}.tmp-job")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)  # a killed earlier save of this step
        tmp.mkdir(parents=True)
    barrier()
    ok = False
    try:
        yield tmp
        ok = True
    finally:
        barrier()
        if is_main_process():
            if ok:
                fsync_tree(tmp)
                old = dest.with_name(f".{dest.name}.old-job")
                if dest.exists():
                    dest.rename(old)
                tmp.rename(dest)
                shutil.rmtree(old, ignore_errors=True)
                fsync_dir(dest.parent)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        barrier()


def to_jsonable(obj: Any) -> Any:
    """Make dataclasses, numpy scalars/arrays and tuples JSON-friendly (RNG states included)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_metadata(folder: str | os.PathLike, *, backend: str, step: int, spec: Any, optim: Any,
                   extra: dict[str, Any], user: dict[str, Any] | None) -> None:
    """Write ``diptych.json``: format/version, backend, step, model config, optimizer config, user metadata."""
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "backend": backend,
        "step": int(step),
        "model_config": spec.to_hf_config(),
        "optim": to_jsonable(optim),
        **to_jsonable(extra),
        "metadata": to_jsonable(user or {}),
    }
    (Path(folder) / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """Read ``diptych.json`` of a checkpoint, with a clear error when it is not one."""
    folder = Path(folder)
    f = folder / METADATA_FILE
    if not f.is_file():
        hint = " It looks like a Hugging Face folder; load it with diptych.core.hf.load_hf_folder." if (
            folder / "config.json").is_file() else ""
        raise CheckpointError(f"{folder} is not a diptych checkpoint (no {METADATA_FILE}).{hint}")
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{f} has format {meta.get('format')!r}, expected {FORMAT!r}.")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{f} is version {meta['version']}; this diptych reads up to {VERSION}. Upgrade diptych.")
    return meta


def optim_from_metadata(meta: dict[str, Any]) -> Any:
    """The optimizer config a checkpoint was trained with."""
    return from_dict(OptimConfig, meta["optim"])


def spec_from_metadata(meta: dict[str, Any]) -> Any:
    """The model spec a checkpoint holds, dispatched on its ``model_type`` like an HF folder."""
    return spec_from_config(meta["model_config"])


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """A JSON-serialisable snapshot of a numpy Generator (store it in checkpoint metadata)."""
    return to_jsonable(rng.bit_generator.state)


def rng_from_state(state: dict[str, Any]) -> np.random.Generator:
    """Rebuild the numpy Generator saved by :func:`rng_state`, continuing the same stream."""
    bitgen = getattr(np.random, state["bit_generator"])()
    bitgen.state = state
    return np.random.Generator(bitgen)
