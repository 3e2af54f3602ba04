"""`diptych parity`: one table per run, PASS/FAIL per quantity, non-zero exit on any FAIL."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from diptych.core.backend import backend_names
from diptych.core.hf import load_hf_folder, tiny_spec_for
from diptych.core.model_types import supported_model_types
from diptych.parity.harness import run_parity

HELP = "compare backends (and transformers) on the same weights and inputs"

# Suites that live in other modules register themselves on import.
SUITE_MODULES = ("diptych.parity.train_suite", "diptych.parity.recurrent_suite")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, help="a local Hugging Face folder (default: embedded tiny model)")
    p.add_argument("--model-type", default="llama", choices=list(supported_model_types()),
                   help="architecture of the embedded tiny model (ignored with --checkpoint)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--backend", action="append", choices=backend_names(),
                   help="limit to these backends (repeatable; default: every installed one)")
    p.add_argument("--suite", action="append", help="run only these suites (repeatable; default: all)")
    p.add_argument("--num-steps", type=int, help="recurrence depth for recurrent-depth models")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers oracle")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the report as JSON")
    p.add_argument("--mesh", metavar="AXIS=N,...",
                   help="sharded parity instead: train-step cases on this mesh (e.g. fsdp=2 or fsdp=2,tensor=2) vs one "
                        "device and across backends; JAX with simulated CPU devices, torch under torchrun")
    p.add_argument("--mesh-case", action="append", metavar="CASE",
                   help="with --mesh: only these cases (repeatable; sft, dpo, grpo, ppo, recurrent; default: all)")
    rec = p.add_mutually_exclusive_group()
    rec.add_argument("--record", type=Path, metavar="DIR",
                     help="write a golden record per backend to DIR/<backend> (docs/parity_records.md)")
    rec.add_argument("--replay", type=Path, metavar="DIR",
                     help="recompute a record (or DIR/*/ records) here and compare under the pair's tolerances")


def run(args: argparse.Namespace) -> int:
    for mod in SUITE_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    if args.record or args.replay:
        return _record_or_replay(args)
    if getattr(args, "mesh", None):
        return _mesh(args)
    if args.checkpoint:
        try:
            spec, weights = load_hf_folder(args.checkpoint)
        except (FileNotFoundError, ValueError) as e:
            print(f"diptych parity: {e}", file=sys.stderr)
            return 2
    else:
        spec, weights = tiny_spec_for(args.model_type), None
    try:
        report = run_parity(spec, weights, dtype=args.dtype, backends=args.backend, suites=args.suite,
                            seed=args.seed, num_steps=args.num_steps, with_transformers=not args.no_transformers,
                            checkpoint=args.checkpoint)
    except (ValueError, RuntimeError) as e:
        print(f"diptych parity: {e}", file=sys.stderr)
        return 2
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.as_json(), indent=2) + "\n")
    return 0 if report.passed else 1


def _mesh(args: argparse.Namespace) -> int:
    """`--mesh`: the sharded train-step cases (diptych.parity.mesh_suite); bad input exits 2 in one line."""
    from diptych.core.backend import available_backends
    from diptych.core.mesh import MeshConfig
    from diptych.core.model_types import RECURRENT_MODEL_TYPES
    from diptych.parity import mesh_suite

    try:
        mesh = MeshConfig.parse(args.mesh)
        recurrent = args.model_type in RECURRENT_MODEL_TYPES
        cases = args.mesh_case or (["recurrent"] if recurrent else None)
        report = mesh_suite.run_mesh(mesh, args.backend or available_backends(), cases, dtype=args.dtype,
                                     model_type="llama" if recurrent else args.model_type)
    except (ValueError, RuntimeError) as e:
        print(f"diptych parity: {e}", file=sys.stderr)
        return 2
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.as_json(), indent=2) + "\n")
    return 0 if report.passed else 1


def _record_or_replay(args: argparse.Namespace) -> int:
    """`--record` / `--replay`: golden records (diptych.parity.golden); bad input exits 2 in one line."""
    from diptych.parity import golden

    try:
        if args.record:
            if args.checkpoint:
                spec, weights = load_hf_folder(args.checkpoint)
                models = [{"spec": spec, "weights": weights, "checkpoint": args.checkpoint}]
            else:
                models = golden.default_models(args.model_type, args.seed)
            return golden.main_record(args.record, args.backend, models, args.dtype)
        report, lines = golden.replay(args.replay, args.backend, checkpoint=args.checkpoint)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"diptych parity: {e}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.as_json(), indent=2) + "\n")
    return 0 if report.passed else 1


def print_report(report) -> None:
    # lazy: rich is only needed to print, not to import the CLI
    from rich.console import Console
    from rich.table import Table

    # Quantity names carry the case (e.g. "weights:grpo after 10"): never truncate them.
    console = Console(width=None if sys.stdout.isatty() else 140)
    table = Table(title="diptych parity")
    for col in ("quantity", "a", "b", "dtype", "max abs", "max rel", "tol", "result"):
        table.add_column(col, justify="right" if col.startswith("max") or col == "tol" else "left",
                         overflow="fold", no_wrap=col != "quantity")
    for c in report.cases:
        verdict = "[green]PASS[/green]" if c.passed else f"[red]FAIL[/red] {c.note}".rstrip()
        table.add_row(c.quantity, c.a, c.b, c.dtype, f"{c.max_abs:.2e}", f"{c.max_rel:.2e}", f"{c.tol:.0e}", verdict)
    console.print(table)
    for s in report.skipped:
        console.print(f"[yellow]skipped[/yellow] {s}")
    for f in getattr(report, "ignored_config_fields", ()):
        console.print(f"[yellow]ignored config field[/yellow] {f}")
    n_fail = sum(not c.passed for c in report.cases)
    console.print(f"{len(report.cases) - n_fail} passed, {n_fail} failed")
