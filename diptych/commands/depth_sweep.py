"""`diptych depth-sweep`: accuracy, mean depth and time vs recurrence depth, fixed and adaptive.

    diptych depth-sweep --checkpoint runs/recurrent_recipe/checkpoint --task word_problem \
        --steps 1,2,4,8,16,32,64 --json sweep.json --plot sweep.png
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from diptych.core.backend import backend_names, resolve_backend_name
from diptych.core.hf import load_hf_folder
from diptych.core.model_types import RECURRENT_MODEL_TYPES, is_recurrent
from diptych.core.tasks import get_task
from diptych.recipes.recurrent_pretrain import CharCodec, _encode
from diptych.recurrent.exit import CRITERIA
from diptych.recurrent.sweep import depth_sweep, plot_sweep

HELP = "accuracy vs recurrence depth for a recurrent model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="a Huginn-format folder with diptych_codec.json")
    p.add_argument("--task", default=None, help="built-in task name (default: the one the checkpoint was trained on)")
    p.add_argument("--steps", default="1,2,4,8,16,32,64", help="comma-separated depths")
    p.add_argument("--criteria", default="kl,latent-diff", help="comma-separated exit criteria ('' for none)")
    p.add_argument("--backend", default=None, choices=backend_names())
    p.add_argument("--n", type=int, default=512, help="held-out problems")
    p.add_argument("--length", default=None, help="override the task's length knob, e.g. 7,10 (harder than training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, metavar="PATH", default=Path("depth_sweep.json"))
    p.add_argument("--plot", type=Path, metavar="PATH", default=Path("depth_sweep.png"))


def _depths(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--steps must be comma-separated integers like 1,2,4,8, got {text!r}.") from None
    if not steps or min(steps) < 1:
        raise ValueError(f"--steps needs depths >= 1, got {text!r}.")
    return steps


def run(args: argparse.Namespace) -> int:
    try:
        steps = _depths(args.steps)
        criteria = [c for c in args.criteria.split(",") if c]
        unknown = [c for c in criteria if c not in CRITERIA]
        if unknown:
            raise ValueError(f"unknown exit criteria {unknown}; choose from {', '.join(CRITERIA)}.")
        spec, weights = load_hf_folder(args.checkpoint)
        if not is_recurrent(spec):
            raise ValueError(f"{args.checkpoint} holds a {spec.model_type} model; depth sweeps need a recurrent one "
                             f"({', '.join(RECURRENT_MODEL_TYPES)}).")
        codec, meta = CharCodec.load(args.checkpoint)
        name = args.task or meta["task"]
        knobs = meta.get("knobs", {}) if name == meta["task"] else {}
        knobs = {k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()}
        if args.length:
            knobs["length"] = tuple(_depths(args.length))
        task = get_task(name, **knobs)
        backend = resolve_backend_name(args.backend or "torch")
    except (ValueError, FileNotFoundError) as e:
        print(f"diptych depth-sweep: {e}", file=sys.stderr)
        return 2
    rb = importlib.import_module(f"diptych.backends.{backend}.recurrent")
    ops = rb._Ops(rb.build(spec, weights))
    rows = task.generate("test", args.n, seed=args.seed + 7)
    tokens, mask, _, _, answers = _encode(codec, rows)
    answer_ids = sorted({codec.index[str(r["answer"])] for r in rows} | {codec.index[c] for c in "0123456789"
                                                                         if c in codec.index})
    sweep = depth_sweep(ops, tokens, mask, answers, answer_ids, steps, criteria=criteria, state_seed=args.seed)
    for r in sweep:
        print(f"{r['mode']:>22s}  r={r['num_steps']:3d}  acc {r['accuracy']:.3f}  mean depth {r['mean_depth']:5.1f}"
              f"  {r['seconds']:.2f}s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "task": name, "knobs": knobs,
                                     "backend": backend, "n": args.n, "rows": sweep}, indent=2, default=list) + "\n")
    plot_sweep(sweep, args.plot, title=f"{name}: accuracy vs depth")
    return 0
