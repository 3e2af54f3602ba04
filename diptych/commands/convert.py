"""``diptych convert SRC DST --to jax|torch|hf``: move a checkpoint between backends and Hugging Face.

SRC is a diptych checkpoint of either backend (a folder with ``diptych.json``) or a Hugging
Face folder (``config.json`` + safetensors). Converting between backends carries the
weights, the value head, the AdamW moments, the step and the caller's metadata, so a run
saved on one backend resumes on the other. ``--to hf`` writes the policy weights only.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from diptych.core import checkpointing as ckpt
from diptych.core.backend import backend_names
from diptych.core.hf import load_hf_folder, save_hf_folder
from diptych.core.optim import OptimConfig

HELP = "convert a checkpoint between backends and Hugging Face folders"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="a diptych checkpoint folder (jax or torch) or a Hugging Face folder")
    parser.add_argument("dst", help="output folder (written atomically)")
    parser.add_argument("--to", required=True, choices=[*backend_names(), "hf"], help="output format")


def run(args: argparse.Namespace) -> int:
    try:
        out = convert(args.src, args.dst, args.to)
    except (ckpt.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"diptych convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.to} checkpoint to {out}")
    return 0


def _modules(backend: str, *concerns: str) -> list[Any]:
    """A backend's modules by name: only the framework of the backend asked for gets imported."""
    return [importlib.import_module(f"diptych.backends.{backend}.{c}") for c in concerns]


def load_portable(src: str | Path) -> dict[str, Any]:
    """Read any supported checkpoint into a backend-neutral dict of numpy arrays and settings.

    Keys: ``spec``, ``weights`` (canonical HF names), ``value_head`` (or None), ``optimizer``
    (``{"count", "mu", "nu"}`` or None), ``optim`` (an ``OptimConfig`` or None), ``step``,
    ``metadata`` (the caller's), ``kernels``.
    """
    src = Path(src)
    if not (src / ckpt.METADATA_FILE).is_file():
        spec, weights = load_hf_folder(src)
        return {"spec": spec, "weights": weights, "value_head": None, "optimizer": None, "optim": None,
                "step": 0, "metadata": {}, "kernels": "auto"}
    meta = ckpt.read_metadata(src)
    backend = meta["backend"]
    if backend not in backend_names():
        raise ckpt.CheckpointError(f"{src} was written by unknown backend {backend!r}; "
                                   f"known: {', '.join(backend_names())}.")
    checkpoint, train = _modules(backend, "checkpoint", "train")
    state, user = checkpoint.restore(src)
    return {"spec": ckpt.spec_from_metadata(meta), "weights": train.export_weights(state),
            "value_head": train.export_value_head(state), "optimizer": train.export_optimizer(state),
            "optim": state.optim, "step": state.step, "metadata": user, "kernels": meta.get("kernels", "auto")}


def convert(src: str | Path, dst: str | Path, to: str) -> Path:
    """Convert ``src`` into ``dst`` in format ``to`` (``"jax"``, ``"torch"`` or ``"hf"``); return ``dst``."""
    p = load_portable(src)
    if to == "hf":
        return save_hf_folder(dst, p["spec"], p["weights"])
    if to not in backend_names():
        raise ValueError(f"--to must be one of {', '.join([*backend_names(), 'hf'])}, got {to!r}.")
    checkpoint, train, model_lib = _modules(to, "checkpoint", "train", "model")
    model = model_lib.build(p["spec"], p["weights"], kernels=p["kernels"])
    state = train.init_train_state(model, p["optim"] or OptimConfig(), value_head=p["value_head"] is not None)
    if p["value_head"] is not None:
        state = train.load_weights(state, p["value_head"])
    if p["optimizer"] is not None:
        state = train.load_optimizer(state, p["optimizer"])
    state.step = int(p["step"])
    return checkpoint.save(state, dst, metadata=p["metadata"])
