"""`diptych sample`: print completions from a checkpoint, or from the embedded tiny model.

Without ``--checkpoint`` it samples the embedded tiny Llama (``tiny_spec()`` with
``init_weights(0)``: untrained, so the text is noise) with the built-in char tokenizer: a
smoke test of a backend's whole generation path that needs no files. With a Hugging Face
checkpoint folder it uses the folder's ``tokenizer.json`` when present.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HELP = "generate completions from a checkpoint or the embedded tiny model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["jax", "torch"], default=None,
                   help="framework to run on (default: $DIPTYCH_BACKEND)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="Hugging Face checkpoint folder (config.json + safetensors); default: embedded tiny model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for a batch)")
    src.add_argument("--prompts-file", type=Path, default=None,
                     help='JSONL: one {"prompt": "..."} object (or a JSON string) per line')
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object per completion instead of text")


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise SystemExit(f"--prompts-file {args.prompts_file} does not exist.")
        prompts = []
        for i, line in enumerate(args.prompts_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{args.prompts_file}:{i}: not valid JSON ({e}).") from None
            text = row.get("prompt") if isinstance(row, dict) else row
            if not isinstance(text, str):
                raise SystemExit(f'{args.prompts_file}:{i}: expected {{"prompt": "..."}} or a JSON string.')
            prompts.append(text)
        if not prompts:
            raise SystemExit(f"{args.prompts_file} holds no prompts.")
        return prompts
    return args.prompt or ["1+1="]


def load_model_and_tokenizer(backend: Any, checkpoint: Path | None) -> tuple[Any, Any]:
    from diptych.core.tokenizer import CharTokenizer, HFTokenizer

    if checkpoint is None:
        from diptych.core.spec import tiny_spec

        tok = CharTokenizer()
        spec = tiny_spec(eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id)
        return backend.build(spec, spec.init_weights(0)), tok
    from diptych.core.hf import load_hf_folder

    spec, weights = load_hf_folder(checkpoint)
    if (checkpoint / "tokenizer.json").is_file():
        tok = HFTokenizer.from_folder(checkpoint)
    else:
        tok = CharTokenizer()
        if spec.vocab_size < tok.vocab_size:
            raise SystemExit(f"{checkpoint} has no tokenizer.json and its vocabulary ({spec.vocab_size}) is too "
                             "small for the char tokenizer; add the tokenizer files to the folder.")
        print(f"note: {checkpoint} has no tokenizer.json; using the built-in char tokenizer.", file=sys.stderr)
    return backend.build(spec, weights), tok


def run(args: argparse.Namespace) -> int:
    from diptych.core.backend import BackendError, get_backend
    from diptych.core.sampling import SamplingConfig, SamplingError

    try:
        backend = get_backend(args.backend)
        model, tok = load_model_and_tokenizer(backend, args.checkpoint)
        texts = read_prompts(args)
        if args.chat:
            texts = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
        ids = [tok.encode(t, add_special_tokens=True) for t in texts]
        eos = model.spec.eos_ids or ((tok.eos_id,) if tok.eos_id is not None else ())
        cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, min_p=args.min_p, n=args.n, eos_ids=tuple(eos), pad_id=tok.pad_id)
        ro = backend.generate(model, ids, cfg, seed=args.seed)
    except (BackendError, SamplingError, ValueError, FileNotFoundError) as e:
        print(f"diptych sample: {e}", file=sys.stderr)
        return 2
    for row, completion in enumerate(ro.completions()):
        prompt = texts[row // args.n]
        text = tok.decode(completion)
        if args.json:
            print(json.dumps({"prompt": prompt, "sample": row % args.n, "completion": text, "tokens": completion,
                              "truncated": bool(ro.truncated[row]),
                              "logprob": float(ro.logprobs[row].sum())}), flush=True)
        else:
            tag = f"[{row // args.n}.{row % args.n}]" if args.n > 1 else f"[{row // args.n}]"
            print(f"{tag} {prompt}{text}" + ("  <truncated>" if ro.truncated[row] else ""), flush=True)
    return 0
