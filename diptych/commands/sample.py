"""`diptych sample`: stream completions from a checkpoint, or from the embedded tiny model.

Without ``--checkpoint`` it samples the embedded tiny Llama (``tiny_spec()`` with
``init_weights(0)``: untrained, so the text is noise) with the built-in char tokenizer: a
smoke test of a backend's whole generation path that needs no files. ``--checkpoint`` takes a
Hugging Face folder (its ``tokenizer.json``, or the built-in tokenizer its
``tokenizer_config.json`` names, as ``diptych quickstart`` saves) or a native diptych checkpoint.

Streaming is done here, not in the samplers: the completion grows in chunks of
``--stream-tokens`` new tokens, each chunk a fresh ``generate`` call on prompt + tokens so far.
Sampling noise is drawn once up front as parity-mode uniforms (row ``r``, step ``t``), and chunk
``c`` gets its slice of them, so the streamed text is the one-shot text, token for token
(``--no-stream`` gives the one-shot path; the tests compare the two).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

HELP = "generate completions from a checkpoint or the embedded tiny model"
DEFAULT_MAX_NEW_TOKENS = 64
MAX_NOISE_BYTES = 1 << 29
"""Above this much parity noise (rows x tokens x vocab x 4 bytes) sampling falls back to seeded noise, unstreamed."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from diptych.core.backend import backend_names

    p.add_argument("--backend", choices=backend_names(), default=None,
                   help="framework to run on (default: $DIPTYCH_BACKEND, else the one that wrote --checkpoint)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="Hugging Face folder (config.json + safetensors) or diptych checkpoint; "
                        "default: embedded tiny model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for a batch)")
    src.add_argument("--prompts-file", type=Path, default=None,
                     help='JSONL: one {"prompt": "..."} object (or a JSON string) per line')
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default: {DEFAULT_MAX_NEW_TOKENS}, lowered to what the model's context leaves")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object per completion instead of text")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="generate in one call and print at the end (same output, no live display)")
    p.add_argument("--stream-tokens", type=int, default=4, metavar="K",
                   help="new tokens per streamed chunk (default 4)")
    p.add_argument("--engine", choices=["native", "vllm"], default="native",
                   help="who samples: the backend's own sampler, or vLLM (docs/vllm.md; prints at the end)")


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


# -- checkpoints ----------------------------------------------------------------------------------
def _is_native(folder: Path) -> bool:
    from diptych.core.checkpointing import METADATA_FILE

    return (folder / METADATA_FILE).is_file()


def checkpoint_backend(checkpoint: Path | None) -> str | None:
    """The backend that wrote ``checkpoint`` (native metadata, or the quickstart's eval record), if known."""
    if checkpoint is None or not checkpoint.is_dir():
        return None
    if _is_native(checkpoint):
        from diptych.core.checkpointing import read_metadata

        return read_metadata(checkpoint).get("backend")
    settings = eval_settings(checkpoint)
    return settings.get("backend") if settings else None


def eval_settings(checkpoint: Path) -> dict[str, Any] | None:
    """How the model in ``checkpoint`` was evaluated when it was saved (``diptych_eval.json``), if recorded."""
    from diptych.commands.quickstart import EVAL_FILE

    native = _is_native(checkpoint)
    for folder in (checkpoint, checkpoint.parent) if native else (checkpoint,):  # final/checkpoint -> final/
        f = folder / EVAL_FILE
        if f.is_file():
            return json.loads(f.read_text())
    if native:
        from diptych.core.checkpointing import read_metadata

        return (read_metadata(checkpoint).get("metadata") or {}).get("eval")
    return None


def _tokenizer_for(folder: Path, vocab_size: int, user_meta: dict[str, Any] | None = None) -> Any:
    from diptych.core.tokenizer import CharTokenizer, load_tokenizer

    for f in (folder, folder.parent) if user_meta is not None else (folder,):
        if (f / "tokenizer.json").is_file() or (f / "tokenizer_config.json").is_file():
            try:
                return load_tokenizer(f)
            except FileNotFoundError:
                continue
    if user_meta and user_meta.get("tokenizer") == "char":
        return CharTokenizer()
    tok = CharTokenizer()
    if vocab_size < tok.vocab_size:
        raise SystemExit(f"{folder} has no tokenizer.json and its vocabulary ({vocab_size}) is too "
                         "small for the char tokenizer; add the tokenizer files to the folder.")
    print(f"note: {folder} has no tokenizer.json; using the built-in char tokenizer.", file=sys.stderr)
    return tok


def load_model_and_tokenizer(backend: Any, checkpoint: Path | None) -> tuple[Any, Any]:
    """The model and tokenizer ``diptych sample`` / ``diptych evaluate`` run; None = the embedded tiny model."""
    from diptych.core.tokenizer import CharTokenizer

    if checkpoint is None:
        from diptych.core.spec import tiny_spec

        tok = CharTokenizer()
        spec = tiny_spec(eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id)
        return backend.build(spec, spec.init_weights(0)), tok
    checkpoint = Path(checkpoint)
    if _is_native(checkpoint):
        from diptych.commands.convert import load_portable

        p = load_portable(checkpoint)
        spec, weights = p["spec"], p["weights"]
        tok = _tokenizer_for(checkpoint, spec.vocab_size, p["metadata"] or {})
    else:
        from diptych.core.hf import load_hf_folder

        spec, weights = load_hf_folder(checkpoint)
        tok = _tokenizer_for(checkpoint, spec.vocab_size)
    return backend.build(spec, weights), tok


# -- generation -----------------------------------------------------------------------------------
@dataclass
class Completion:
    """One row (sample ``sample`` of prompt ``prompt_index``) as it grows."""

    prompt_index: int
    sample: int
    tokens: list[int]
    logprobs: list[float]
    done: bool = False
    """EOS reached; a row that runs out of tokens is ``truncated`` instead."""
    finished: bool = False
    """No more tokens will come (EOS, or the budget ran out)."""

    @property
    def truncated(self) -> bool:
        return self.finished and not self.done


def sampling_noise(rows: int, sampling: Any, vocab_size: int, seed: int) -> np.ndarray | None:
    """The parity-mode uniforms both paths use, or None when greedy (or too big to hold; then seeded noise)."""
    from diptych.core.sampling import parity_noise

    if sampling.greedy or rows * sampling.max_new_tokens * vocab_size * 4 > MAX_NOISE_BYTES:
        return None
    return parity_noise(rows, sampling.max_new_tokens, vocab_size, seed)


def generate_once(backend: Any, model: Any, prompts: Sequence[Sequence[int]], sampling: Any,
                  noise: np.ndarray | None, seed: int) -> list[Completion]:
    """The reference path: one ``generate`` call."""
    ro = backend.generate(model, [list(p) for p in prompts], sampling, noise=noise, seed=seed)
    n = sampling.n
    return [Completion(r // n, r % n, c, [float(x) for x in ro.logprobs[r, :len(c)]],
                       done=not bool(ro.truncated[r]), finished=True) for r, c in enumerate(ro.completions())]


def generate_with_engine(backend: Any, model: Any, prompts: Sequence[Sequence[int]], sampling: Any,
                         seed: int) -> list[Completion]:
    """``--engine vllm``: one call to a vLLM engine started on the model's weights (not streamed: vLLM draws its own
    noise, so chunks would not add up to the one-shot text)."""
    from diptych.rollout import make_engine

    engine = make_engine("vllm", backend, model, sampling=sampling)
    try:
        ro = engine.generate([list(p) for p in prompts], sampling, seed=seed)
    finally:
        engine.close()
    n = sampling.n
    return [Completion(r // n, r % n, c, [float(x) for x in ro.logprobs[r, :len(c)]],
                       done=not bool(ro.truncated[r]), finished=True) for r, c in enumerate(ro.completions())]


def generate_stream(backend: Any, model: Any, prompts: Sequence[Sequence[int]], sampling: Any,
                    noise: np.ndarray | None, seed: int, chunk: int = 4) -> Iterator[list[Completion]]:
    """Yield every row after each chunk of ``chunk`` new tokens; the last yield equals :func:`generate_once`.

    Every row stays in every call (finished ones are fed along and their output dropped) so the
    batch shape, hence a JAX compile, is reused across chunks. Greedy decoding and parity noise make
    the chunked tokens the one-shot tokens, up to float noise between a cached and a fresh prefill.
    """
    if chunk < 1:
        raise ValueError(f"--stream-tokens must be >= 1, got {chunk}.")
    if sampling.stop_sequences:
        raise ValueError("streaming does not support stop_sequences (a match could span two chunks).")
    from diptych.core.sampling import prepare_prompts

    prepare_prompts(prompts, sampling, model.spec)  # the whole budget must fit, as in one call
    n = sampling.n
    rows = [list(p) for p in prompts for _ in range(n)]
    out = [Completion(r // n, r % n, [], []) for r in range(len(rows))]
    total, t = int(sampling.max_new_tokens), 0
    while t < total and not all(c.finished for c in out):
        k = min(chunk, total - t)
        sub = replace(sampling, max_new_tokens=k, n=1)
        part = None if noise is None else np.ascontiguousarray(noise[:, t:t + k])
        ro = backend.generate(model, [rows[r] + out[r].tokens for r in range(len(rows))], sub, noise=part,
                              seed=seed + t)
        for r, c in enumerate(ro.completions()):
            row = out[r]
            if row.finished:
                continue
            row.tokens += c
            row.logprobs += [float(x) for x in ro.logprobs[r, :len(c)]]
            row.done = not bool(ro.truncated[r])
            row.finished = row.done or t + k >= total
        t += k
        yield out


# -- output ---------------------------------------------------------------------------------------
def format_row(row: Completion, prompts: Sequence[str], tok: Any, n: int, as_json: bool, cursor: str = "") -> str:
    prompt, text = prompts[row.prompt_index], tok.decode(row.tokens)
    if as_json:
        return json.dumps({"prompt": prompt, "sample": row.sample, "completion": text, "tokens": row.tokens,
                           "truncated": row.truncated, "logprob": float(np.sum(row.logprobs, dtype=np.float32))})
    tag = f"[{row.prompt_index}.{row.sample}]" if n > 1 else f"[{row.prompt_index}]"
    return f"{tag} {prompt}{text}" + ("  <truncated>" if row.truncated else "") + ("" if row.finished else cursor)


def emit(updates: Iterator[list[Completion]], prompts: Sequence[str], tok: Any, n: int, as_json: bool,
         live_console: Any = None) -> None:
    """Print rows in order, each as soon as it and every row before it are finished; live-redraw on a terminal."""
    printed = 0
    live = None
    if live_console is not None and not as_json:
        from rich.live import Live
        from rich.text import Text

        live = Live(Text(""), console=live_console, refresh_per_second=20, transient=False)
        live.start()
    try:
        rows: list[Completion] = []
        for rows in updates:
            if live is not None:
                live.update(Text("\n".join(format_row(r, prompts, tok, n, False, cursor="▌") for r in rows)))
                continue
            while printed < len(rows) and rows[printed].finished:
                print(format_row(rows[printed], prompts, tok, n, as_json), flush=True)
                printed += 1
        if live is not None:
            live.update(Text("\n".join(format_row(r, prompts, tok, n, False) for r in rows)))
    finally:
        if live is not None:
            live.stop()


def run(args: argparse.Namespace) -> int:
    import os

    from diptych.core.backend import BackendError, get_backend
    from diptych.core.sampling import SamplingConfig, SamplingError

    try:
        name = args.backend or os.environ.get("DIPTYCH_BACKEND") or checkpoint_backend(args.checkpoint)
        backend = get_backend(name)
        model, tok = load_model_and_tokenizer(backend, args.checkpoint)
        texts = read_prompts(args)
        if args.chat:
            texts = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
        ids = [tok.encode(t, add_special_tokens=True) for t in texts]
        max_new = args.max_new_tokens
        if max_new is None:
            room = int(getattr(model.spec, "max_position_embeddings", 1 << 30)) - max(len(i) for i in ids)
            max_new = max(1, min(DEFAULT_MAX_NEW_TOKENS, room))
        eos = model.spec.eos_ids or ((tok.eos_id,) if tok.eos_id is not None else ())
        cfg = SamplingConfig(max_new_tokens=max_new, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, min_p=args.min_p, n=args.n, eos_ids=tuple(eos), pad_id=tok.pad_id)
        noise = None if args.engine == "vllm" else sampling_noise(len(ids) * args.n, cfg, model.spec.vocab_size,
                                                                  args.seed)
        stream = args.stream and args.engine == "native" and (noise is not None or cfg.greedy)
        if args.stream and not stream and args.engine == "native":
            print("note: the sampling noise for this batch is too large to stream exactly; printing at the end.",
                  file=sys.stderr)
        if args.engine == "vllm":
            updates = iter([generate_with_engine(backend, model, ids, cfg, args.seed)])
        elif stream:
            updates = generate_stream(backend, model, ids, cfg, noise, args.seed, args.stream_tokens)
        else:
            updates = iter([generate_once(backend, model, ids, cfg, noise, args.seed)])
        console = None
        if stream and not args.json and sys.stdout.isatty():
            from rich.console import Console

            console = Console()
        emit(updates, texts, tok, args.n, args.json, live_console=console)
    except (BackendError, SamplingError, ValueError, FileNotFoundError) as e:
        print(f"diptych sample: {e}", file=sys.stderr)
        return 2
    return 0
