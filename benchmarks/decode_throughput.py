"""Decode throughput: diptych's JAX and torch samplers against transformers' ``generate``.

Same tiny model (weights from one numpy seed), same left-padded batch, same number of new
tokens (EOS disabled so every row runs to the end), in one process. Each engine is warmed up
first; the first call's extra time is reported as compile / warm-up time and excluded from
tokens/s, which is the median over ``--repeats`` timed runs.

    python benchmarks/decode_throughput.py --json results/decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diptych.core.sampling import SamplingConfig
from diptych.core.spec import tiny_spec


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return first, runs


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(max(1, prompt_len // 2), prompt_len + 1, size=batch)
    lens[0] = prompt_len
    return [rng.integers(3, vocab, size=int(n)).tolist() for n in lens]


def hf_runner(spec, weights, prompts, cfg: SamplingConfig, tmp: Path) -> Callable[[], object]:
    import torch
    import transformers

    from diptych.core.hf import save_hf_folder
    from diptych.core.sampling import prepare_prompts

    folder = save_hf_folder(tmp / "hf", spec, weights)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tok, mask = prepare_prompts(prompts, SamplingConfig(pad_id=0), spec)
    ids, am = torch.tensor(tok, dtype=torch.long), torch.tensor(mask)
    kw = dict(do_sample=False) if cfg.greedy else dict(do_sample=True, temperature=cfg.temperature,
                                                        top_k=cfg.top_k or None, top_p=cfg.top_p)

    def run() -> object:
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=am, max_new_tokens=cfg.max_new_tokens,
                                  min_new_tokens=cfg.max_new_tokens, pad_token_id=0, eos_token_id=None, **kw)

    return run


def diptych_runner(name: str, spec, weights, prompts, cfg: SamplingConfig) -> Callable[[], object]:
    from diptych.core.backend import get_backend

    backend = get_backend(name)
    model = backend.build(spec, weights)
    return lambda: backend.generate(model, prompts, cfg, seed=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model-type", default="llama", choices=["llama", "qwen2", "qwen3"])
    p.add_argument("--modes", default="greedy,sample", help="comma list of greedy, sample")
    p.add_argument("--engines", default="transformers,jax,torch")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads for transformers and the torch backend alike (tiny models decode "
                        "fastest on one; on a busy machine more threads spin and slow both down); 0 = torch default")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    if args.torch_threads > 0 and "torch" in args.engines + ",transformers":
        import torch

        torch.set_num_threads(args.torch_threads)

    import tempfile

    spec = tiny_spec(args.model_type)
    weights = spec.init_weights(0)
    prompts = make_prompts(args.batch, args.prompt_len, spec.vocab_size, seed=0)
    configs = {
        "greedy": SamplingConfig(temperature=0, max_new_tokens=args.max_new_tokens, eos_ids=()),
        "sample": SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, max_new_tokens=args.max_new_tokens,
                                 eos_ids=()),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            cfg = configs[mode]
            base = None
            for engine in args.engines.split(","):
                if engine == "transformers":
                    fn = hf_runner(spec, weights, prompts, cfg, Path(tmp) / mode)
                else:
                    fn = diptych_runner(engine, spec, weights, prompts, cfg)
                first, runs = timed(fn, args.repeats)
                med = statistics.median(runs)
                tps = args.batch * args.max_new_tokens / med
                base = tps if engine == "transformers" else base
                rows.append(dict(mode=mode, engine=engine, tokens_per_s=tps, seconds=med,
                                 warmup_extra_s=max(0.0, first - med), runs_s=runs,
                                 speedup_vs_transformers=None if base is None else tps / base))
    meta = dict(model=args.model_type, params=spec.num_params(), batch=args.batch, prompt_len=args.prompt_len,
                max_new_tokens=args.max_new_tokens, repeats=args.repeats, torch_threads=args.torch_threads,
                cpu=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count())
    print(f"decode throughput, tiny {args.model_type} ({spec.num_params()} params), batch {args.batch}, "
          f"prompt <= {args.prompt_len}, {args.max_new_tokens} new tokens, median of {args.repeats}, "
          f"torch threads {args.torch_threads or 'default'}")
    print(f"{'mode':8} {'engine':14} {'tokens/s':>10} {'x HF':>6} {'warm-up+compile s':>18}")
    for r in rows:
        x = "" if r["speedup_vs_transformers"] is None else f"{r['speedup_vs_transformers']:.2f}"
        print(f"{r['mode']:8} {r['engine']:14} {r['tokens_per_s']:10.0f} {x:>6} {r['warmup_extra_s']:18.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, results=rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
