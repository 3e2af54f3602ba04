"""Decode throughput: diptych's JAX and torch samplers against transformers' ``generate``.

Same model (weights from one numpy seed), same left-padded batch, same number of new tokens
(EOS disabled so every row runs to the end), in one process, under the shared discipline
(``benchmarks/discipline.py``: one thread count for all, alternating rounds, median round,
refusal on a loaded machine). Each engine is warmed up once when it is built; that call's time
is reported as warm-up (compilation for JAX) and excluded from tokens/s.

Shapes: ``--shape tiny`` (the tests' 2-layer model: overhead-bound) and ``--shape compute``
(hidden 512, 8 layers, 64 rows = 8 prompts x 8, 128 new tokens: matmul-bound). Both report FLOP
utilisation: model FLOP/s (``discipline.decode_flops``: per row a causal forward over
``prompt + new - 1`` tokens, ``2 * matmul_params * tokens + 2 * layers * q_dim * S * (S + 1)``)
over the fp32 matmul FLOP/s the same run measures on the contender's backend (torch for
transformers and diptych-torch, jax for diptych-jax) at the same thread count.

    python benchmarks/decode_throughput.py --shape compute --json benchmarks/results/decode_compute.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import discipline

THREADS = discipline.pin_threads_early()  # before numpy, torch and jax load

import numpy as np  # noqa: E402

from diptych.core.sampling import SamplingConfig  # noqa: E402
from diptych.core.spec import tiny_spec  # noqa: E402

SHAPES = {
    "tiny": dict(spec={}, batch=8, prompt_len=16, max_new_tokens=128),
    "compute": dict(spec=dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                              intermediate_size=1536), batch=64, prompt_len=16, max_new_tokens=128),
}
ROOFLINE_OF = {"transformers": "torch", "torch": "torch", "jax": "jax"}


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


def diptych_runner(name: str, spec, weights, prompts, cfg: SamplingConfig, torch_compile: bool = False
                   ) -> Callable[[], object]:
    from diptych.core.backend import get_backend

    backend = get_backend(name)
    model = backend.build(spec, weights)
    kw = {"compile": True} if torch_compile and name == "torch" else {}
    return lambda: backend.generate(model, prompts, cfg, seed=0, **kw)


def contender(fn: Callable[[], object], new_tokens: int, flops: float) -> tuple[float, Callable[[], dict]]:
    """Warm ``fn`` up once (its time is returned) and wrap it as one round's measurement."""
    warmup, _ = discipline.timed(fn)

    def run() -> dict:
        seconds, _ = discipline.timed(fn)
        return {"seconds": seconds, "tokens_per_s": new_tokens / seconds, "flops_per_s": flops / seconds}

    return warmup, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=list(SHAPES), help="preset (see the module docstring)")
    p.add_argument("--batch", type=int, help="rows (default: the preset's)")
    p.add_argument("--prompt-len", type=int, help="longest prompt (default: the preset's)")
    p.add_argument("--max-new-tokens", type=int, help="new tokens per row (default: the preset's)")
    p.add_argument("--model-type", default="llama", choices=["llama", "qwen2", "qwen3"])
    p.add_argument("--modes", default="greedy,sample", help="comma list of greedy, sample")
    p.add_argument("--engines", default="transformers,jax,torch")
    p.add_argument("--roofline-n", type=int, default=2048, help="side of the fp32 matmul that measures the roofline")
    p.add_argument("--torch-compile", action="store_true",
                   help="diptych-torch decodes through torch.compile (its compile time is the warm-up: on CPU about a "
                        "minute for about 15%% at the tiny shape, so off by default)")
    discipline.add_arguments(p)
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    batch = args.batch or shape["batch"]
    prompt_len = args.prompt_len or shape["prompt_len"]
    new = args.max_new_tokens or shape["max_new_tokens"]
    engines = args.engines.split(",")
    spec = tiny_spec(args.model_type, **shape["spec"])
    config = dict(shape=args.shape, model=args.model_type, spec=dict(shape["spec"]), params=spec.num_params(),
                  matmul_params=discipline.matmul_params(spec), batch=batch, prompt_len=prompt_len,
                  max_new_tokens=new, engines=engines, roofline_n=args.roofline_n, torch_compile=args.torch_compile)
    bench = discipline.Bench("decode_throughput", args, config)
    weights = spec.init_weights(0)
    prompts = make_prompts(batch, prompt_len, spec.vocab_size, seed=0)
    flops = discipline.decode_flops(spec, [len(q) for q in prompts], new)
    config["model_flops_per_call"] = flops
    roof_backends = ["numpy", *sorted({ROOFLINE_OF[e] for e in engines})]
    roof = bench.run({b: discipline.matmul_contender(b, args.roofline_n) for b in roof_backends}, "flops_per_s",
                     tag="roofline")
    configs = {
        "greedy": SamplingConfig(temperature=0, max_new_tokens=new, eos_ids=()),
        "sample": SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, max_new_tokens=new, eos_ids=()),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            cfg = configs[mode]
            warm, runs = {}, {}
            for engine in engines:
                fn = (hf_runner(spec, weights, prompts, cfg, Path(tmp) / mode) if engine == "transformers"
                      else diptych_runner(engine, spec, weights, prompts, cfg, args.torch_compile))
                warm[engine], runs[engine] = contender(fn, batch * new, flops)
            res = bench.run(runs, "tokens_per_s", tag=mode)
            base = res.get("transformers", {}).get("tokens_per_s")
            for engine in engines:
                r = res[engine]
                peak = roof[ROOFLINE_OF[engine]]["flops_per_s"]
                rows.append(dict(mode=mode, engine=engine, tokens_per_s=r["tokens_per_s"], seconds=r["seconds"],
                                 flops_per_s=r["flops_per_s"], roofline_backend=ROOFLINE_OF[engine],
                                 roofline_flops_per_s=peak, flop_utilisation=r["flops_per_s"] / peak,
                                 warmup_s=warm[engine], rounds_tokens_per_s=[x["tokens_per_s"] for x in r["rounds"]],
                                 speedup_vs_transformers=None if base is None else r["tokens_per_s"] / base))
    table = [f"{args.shape} {args.model_type} ({spec.num_params()} params), batch {batch}, prompt <= {prompt_len}, "
             f"{new} new tokens; matmul roofline GFLOP/s: "
             + ", ".join(f"{b} {roof[b]['flops_per_s'] / 1e9:.1f}" for b in roof_backends),
             f"{'mode':8} {'engine':14} {'tokens/s':>10} {'x HF':>6} {'GFLOP/s':>9} {'util':>6} {'warm-up s':>10}"]
    for r in rows:
        x = "" if r["speedup_vs_transformers"] is None else f"{r['speedup_vs_transformers']:.2f}"
        table.append(f"{r['mode']:8} {r['engine']:14} {r['tokens_per_s']:10.0f} {x:>6} {r['flops_per_s'] / 1e9:9.2f} "
                     f"{r['flop_utilisation']:6.1%} {r['warmup_s']:10.2f}")
    return bench.finish(dict(roofline=roof, decode=rows), table, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
