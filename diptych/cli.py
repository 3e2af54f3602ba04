"""The `diptych` command line: one subcommand per module, imported only when used.

Each subcommand module exposes ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Importing lazily keeps ``diptych --help`` instant and lets a command
whose framework is missing fail with its own clear message instead of breaking the others.

An error reaches the user as one line (what was wrong and how to fix it) and exit status 2 for bad
input, 1 for a run that failed; ``--debug`` (before or after the command) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from diptych.core.backend import backend_names

COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("diptych.commands.quickstart", "SFT warm start then GRPO on the built-in arithmetic task"),
    "train": ("diptych.commands.train", "train with sft | dpo | grpo | ppo from a YAML config and flags"),
    "sample": ("diptych.commands.sample", "generate completions from a checkpoint or the embedded tiny model"),
    "parity": ("diptych.parity.cli", "compare backends (and transformers) on the same weights and inputs"),
    "convert": ("diptych.commands.convert", "convert a checkpoint between backends and Hugging Face folders"),
    "depth-sweep": ("diptych.commands.depth_sweep", "accuracy vs recurrence depth for a recurrent model"),
    "evaluate": ("diptych.commands.evaluate", "held-out greedy accuracy of a checkpoint on a built-in task"),
    "retrofit": ("diptych.commands.retrofit", "turn a Llama/Qwen2 folder into a Huginn-format recurrent-depth model"),
    "rollout-server": ("diptych.commands.rollout_server",
                       "serve a vLLM rollout engine over HTTP (generate, weight sync, version check)"),
    "env": ("diptych.commands.env", "versions, backends, devices and thread settings, to paste into a bug report"),
}


def add_backend_argument(parser: argparse.ArgumentParser, *, default: str | None = None, required: bool = False,
                         help: str | None = None) -> argparse.Action:
    """``--backend`` with the registered backends as its choices (third-party ones included), for every command."""
    return parser.add_argument(
        "--backend", default=default, required=required, choices=backend_names(),
        help=help or f"framework to run on ({' | '.join(backend_names())}); default: $DIPTYCH_BACKEND")


def _load(name: str):
    module, _ = COMMANDS[name]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return None
        raise


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diptych", description="One post-training algorithm on JAX or PyTorch.")
    parser.add_argument("--version", action="version", version="diptych 0.1.0")
    parser.add_argument("--debug", action="store_true", dest="global_debug",
                        help="show the traceback of an error instead of its one-line message")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            mod = _load(name)
            if mod is not None:
                mod.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    mod = _load(args.command)
    if mod is None:
        print(f"diptych {args.command}: not available in this build.", file=sys.stderr)
        return 2
    # --debug may come before the command or among a command's own options (train re-parses those itself)
    args.debug = bool(args.global_debug or getattr(args, "debug", None) or "--debug" in argv)
    try:
        return int(mod.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        return report_error(args.command, e)


INPUT_ERRORS = (ValueError, KeyError, LookupError, OSError, TypeError, ImportError)
"""Exceptions meaning the input (config, data, files, environment) was wrong: exit 2; anything else exits 1."""


def report_error(command: str, error: BaseException) -> int:
    """Print ``error`` as one line plus the --debug hint on stderr; the exit status (2 bad input, 1 otherwise)."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else error
    lines = str(text).strip().splitlines()
    first = lines[0] if lines else type(error).__name__
    known = type(error).__module__.startswith("diptych")
    line = first if known else f"{type(error).__name__}: {first}"
    print(f"diptych {command}: {line}\n(rerun with --debug for the traceback)", file=sys.stderr)
    return 2 if isinstance(error, INPUT_ERRORS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
