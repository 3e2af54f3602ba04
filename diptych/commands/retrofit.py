"""``diptych retrofit``: turn a Llama / Qwen2 folder into a Huginn-format recurrent-depth model.

    diptych retrofit --checkpoint HF_DIR --prelude 2 --core 4 --coda 2 --out DIR [--mean-recurrence 4]

The first layers become the prelude, the last the coda, the layers just before the coda the looped core
block; the adapter starts so that one iteration feeds the core what the source feeds it (see
``diptych.core.retrofit`` for what carries over exactly and what Huginn's sandwich norms change). The output
folder is a Huginn checkpoint (``config.json`` + safetensors, plus the source's tokenizer files) that every
recurrent command reads; train it with the recurrence curriculum (``diptych.recurrent.schedule``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from diptych.core.hf import load_hf_folder, save_hf_folder
from diptych.core.retrofit import RetrofitError, retrofit

HELP = "turn a Llama/Qwen2 folder into a Huginn-format recurrent-depth model"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "diptych_codec.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="a Hugging Face Llama or Qwen2 folder")
    p.add_argument("--prelude", type=int, required=True, help="source layers kept as the prelude (the first ones)")
    p.add_argument("--core", type=int, required=True, help="source layers that initialise the looped core block")
    p.add_argument("--coda", type=int, required=True, help="source layers kept as the coda (the last ones)")
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    p.add_argument("--mean-recurrence", type=int, default=4, help="the model's default depth r")
    p.add_argument("--mean-backprop-depth", type=int, default=None, help="default k (default: r // 2)")


def retrofit_folder(checkpoint: str | Path, out: str | Path, prelude: int, core: int, coda: int, *,
                    mean_recurrence: int = 4, mean_backprop_depth: int | None = None) -> Path:
    """Read ``checkpoint``, retrofit it and write the Huginn folder ``out`` (with the source's tokenizer files)."""
    src, weights = load_hf_folder(checkpoint)
    spec, w = retrofit(src, weights, prelude, core, coda, mean_recurrence=mean_recurrence,
                       mean_backprop_depth=mean_backprop_depth)
    extra = {n: (Path(checkpoint) / n).read_text() for n in TOKENIZER_FILES if (Path(checkpoint) / n).is_file()
             and n != "tokenizer.model"}
    path = save_hf_folder(out, spec, w, extra_files=extra)
    if (Path(checkpoint) / "tokenizer.model").is_file():  # binary (sentencepiece)
        shutil.copyfile(Path(checkpoint) / "tokenizer.model", path / "tokenizer.model")
    return path


def run(args: argparse.Namespace) -> int:
    try:
        path = retrofit_folder(args.checkpoint, args.out, args.prelude, args.core, args.coda,
                               mean_recurrence=args.mean_recurrence, mean_backprop_depth=args.mean_backprop_depth)
    except (RetrofitError, FileNotFoundError, ValueError) as e:
        print(f"diptych retrofit: {e}", file=sys.stderr)
        return 2
    print(f"wrote a Huginn-format recurrent model to {path} "
          f"(prelude {args.prelude}, core {args.core} x r={args.mean_recurrence}, coda {args.coda})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run without the top-level CLI (until ``diptych retrofit`` is listed in ``diptych.cli``)."""
    parser = argparse.ArgumentParser(prog="diptych retrofit", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
