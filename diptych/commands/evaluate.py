"""`diptych evaluate`: held-out greedy accuracy of a saved model on a built-in task.

It measures exactly what the quickstart and ``diptych train`` report: greedy decoding on the
task's ``test`` split (rows never used in training), scored by the task's own verifier. A folder
saved by ``diptych quickstart`` records its task, knobs, seed, row count and lengths
(``diptych_eval.json``), so ``diptych evaluate --checkpoint runs/quickstart/final`` reproduces the
accuracy the quickstart printed; flags override the record.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

HELP = "held-out greedy accuracy of a checkpoint on a built-in task"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from diptych.core.backend import backend_names

    p.add_argument("--checkpoint", type=Path, required=True,
                   help="Hugging Face folder or diptych checkpoint (e.g. runs/quickstart/final)")
    p.add_argument("--backend", choices=backend_names(), default=None,
                   help="default: $DIPTYCH_BACKEND, else the one that wrote --checkpoint")
    p.add_argument("--task", default=None, help="built-in task (default: the one recorded with the checkpoint)")
    p.add_argument("--n", type=int, default=None, help="held-out prompts (default: as recorded, else 200)")
    p.add_argument("--seed", type=int, default=None, help="seed of the test split (default: as recorded, else 0)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: as recorded, else 32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON")


def settings_for(args: argparse.Namespace, recorded: dict[str, Any] | None) -> dict[str, Any]:
    """Flags over the checkpoint's record over defaults; task knobs are kept only when the task is the recorded one."""
    rec = recorded or {}
    task = args.task or rec.get("task")
    if task is None:
        raise ValueError(f"{args.checkpoint} records no task; pass --task (e.g. --task arithmetic).")
    same = task == rec.get("task")
    return {"task": task, "task_knobs": rec.get("task_knobs", {}) if same else {},
            "n": args.n if args.n is not None else (rec.get("n", 200) if same else 200),
            "seed": args.seed if args.seed is not None else (rec.get("seed", 0) if same else 0),
            "max_new_tokens": args.max_new_tokens or (rec.get("max_new_tokens", 32) if same else 32),
            "recorded_accuracy": rec.get("accuracy") if same else None}


def evaluate_checkpoint(backend: Any, checkpoint: Path, settings: dict[str, Any], batch_size: int = 64
                        ) -> dict[str, Any]:
    """Greedy accuracy of ``checkpoint`` under ``settings`` (task, task_knobs, n, seed, max_new_tokens)."""
    from diptych.commands.sample import load_model_and_tokenizer
    from diptych.core.tasks import get_task
    from diptych.core.trainers.base import evaluate

    if int(settings["n"]) < 1:
        raise ValueError(f"--n must be >= 1, got {settings['n']}.")
    model, tok = load_model_and_tokenizer(backend, checkpoint)
    task = get_task(settings["task"], **settings["task_knobs"])
    rows = task.generate("test", int(settings["n"]), int(settings["seed"]))
    longest = max(len(tok.encode(r["prompt"])) for r in rows)
    figures = evaluate(backend, model, tok, task, rows, longest, int(settings["max_new_tokens"]), batch_size)
    return {"backend": backend.name, "checkpoint": str(checkpoint), **{k: v for k, v in settings.items()
                                                                        if k != "recorded_accuracy"}, **figures}


def run(args: argparse.Namespace) -> int:
    from diptych.commands.sample import checkpoint_backend, eval_settings
    from diptych.core.backend import BackendError, get_backend
    from diptych.core.sampling import SamplingError
    from diptych.core.trainers.base import TrainerError

    try:
        if not args.checkpoint.is_dir():
            raise FileNotFoundError(f"--checkpoint {args.checkpoint} is not a folder; pass the folder the model "
                                    "was saved to (e.g. runs/quickstart/final).")
        settings = settings_for(args, eval_settings(args.checkpoint))
        backend = get_backend(args.backend or os.environ.get("DIPTYCH_BACKEND") or checkpoint_backend(args.checkpoint))
        result = evaluate_checkpoint(backend, args.checkpoint, settings, args.batch_size)
    except (BackendError, SamplingError, TrainerError, ValueError, FileNotFoundError) as e:
        print(f"diptych evaluate: {e}", file=sys.stderr)
        return 2
    line = (f"[{result['backend']}] held-out greedy accuracy on {result['task']} ({result['n']} test prompts, "
            f"seed {result['seed']}): {result['accuracy']:.1%}")
    if settings["recorded_accuracy"] is not None:
        line += f" (recorded when saved: {settings['recorded_accuracy']:.1%})"
    print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0
