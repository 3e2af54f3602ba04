"""GRPO throughput: diptych (each installed backend) vs TRL's GRPOTrainer, same model and shapes, one run.

Every contender trains the same Llama (same numpy-initialised weights, char vocabulary)
with the same prompts, batch (prompts x group size), completion length, temperature,
loss (GRPO, the preset's beta (``--beta``), one optimizer pass per batch) and a trivial reward, so the figure
measured is the framework's generate + score + train loop. Throughput is
``(generated tokens + trained tokens) / seconds`` over the measured steps (the first
``--warmup`` steps, which include compilation, are excluded for everyone). The shared
discipline (``benchmarks/discipline.py``) applies: one thread count for everyone, contenders
alternating round by round, the median round reported, refusal on a loaded machine.

Shapes: ``--shape tiny`` (hidden 64, 2 layers, 8 prompts x 4, 16 new tokens: overhead-bound),
``--shape target`` (hidden 128, 4 layers, 4 prompts x 8, 32 new tokens, beta 0.04: issue 15's 3x target, the
reference model's log-probs in every step) and ``--shape compute`` (hidden 512, 8 layers, 8 prompts x 8,
128 new tokens: matmul-bound).
Both report FLOP utilisation: model FLOP/s over the fp32 matmul FLOP/s measured in the same run
on the contender's backend (jax for diptych-jax, torch for diptych-torch and TRL). Model FLOPs
per step are ``discipline.grpo_step_flops``: for every sequence a causal forward over
``prompt + completion - 1`` tokens to generate it plus 3x a causal forward over
``prompt + completion`` to train on it (forward + backward), where a causal forward over S
tokens is ``2 * matmul_params * S + 2 * layers * q_dim * S * (S + 1)``. Prompt lengths are exact;
completion lengths are the step's mean (the attention term is a few percent of the total).

TRL is optional and never downloaded here: ``--trl-path DIR`` prepends a folder where
``pip install --no-deps --target DIR trl accelerate datasets dill multiprocess xxhash
pandas python-dateutil pytz tzdata`` put it (kept out of the project venv so torch is
never replaced). If TRL cannot be imported or run, the JSON says why.

    python benchmarks/grpo_throughput.py --json benchmarks/results/grpo_throughput.json --trl-path /tmp/trl
    python benchmarks/grpo_throughput.py --shape compute --json benchmarks/results/grpo_compute.json --trl-path /tmp/trl
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import discipline

THREADS = discipline.pin_threads_early()  # before numpy, torch and jax load

PRESETS = {
    "tiny": {"prompts_per_step": 8, "group_size": 4, "max_prompt_len": 12, "max_new_tokens": 16, "temperature": 1.0,
             "lr": 1e-5, "beta": 0.0, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 128},
    # issue 15's target shape: the reference model is in the loop (beta > 0), as in most GRPO recipes
    "target": {"prompts_per_step": 4, "group_size": 8, "max_prompt_len": 12, "max_new_tokens": 32, "temperature": 1.0,
               "lr": 1e-5, "beta": 0.04, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 256},
    "compute": {"prompts_per_step": 8, "group_size": 8, "max_prompt_len": 12, "max_new_tokens": 128,
                "temperature": 1.0, "lr": 1e-5, "beta": 0.0, "hidden_size": 512, "num_hidden_layers": 8,
                "num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 1536},
}
SHAPES = dict(PRESETS["tiny"])
"""The shapes in force (``--shape`` and the overrides replace them before any contender runs)."""
ROOFLINE_OF = {"diptych-jax": "jax", "diptych-torch": "torch", "trl": "torch", "matmul-floor": "torch"}


def reward_len(prompts: list[str], completions: list[Any], **kw: Any) -> list[float]:
    """Cheap, framework-free reward (so scoring cost is the same for everyone)."""
    return [float(len(str(c)) % 3) for c in completions]


def make_spec_and_rows(seed: int = 0) -> tuple[Any, Any, list[dict[str, Any]]]:
    from diptych.core.spec import DecoderSpec
    from diptych.core.tasks import get_task
    from diptych.core.tokenizer import CharTokenizer

    tok = CharTokenizer()
    s = SHAPES
    spec = DecoderSpec(model_type="llama", vocab_size=tok.vocab_size, hidden_size=s["hidden_size"],
                       num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
                       num_key_value_heads=s["num_key_value_heads"], intermediate_size=s["intermediate_size"],
                       max_position_embeddings=max(64, 2 * (s["max_prompt_len"] + s["max_new_tokens"])),
                       initializer_range=0.05, bos_token_id=tok.bos_id,
                       eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    rows = get_task("arithmetic", digits=2, ops=("+",)).generate("train", 512, seed)
    return spec, tok, rows


def bench_diptych(name: str, steps: int, warmup: int) -> dict[str, Any]:
    from diptych.core.backend import get_backend
    from diptych.core.optim import OptimConfig
    from diptych.core.trainers.base import batch_iterator, encode_prompts
    from diptych.core.trainers.grpo import GRPOConfig, grpo_step

    backend = get_backend(name)
    spec, tok, rows = make_spec_and_rows()
    s = SHAPES
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    # TRL's field names where the library has them (the older names are deprecated aliases there)
    names = {"num_generations": "group_size", "max_prompt_length": "max_prompt_len",
             "max_completion_length": "max_new_tokens", "loss_type": "loss"}
    values = {"num_generations": s["group_size"], "max_prompt_length": s["max_prompt_len"],
              "max_completion_length": s["max_new_tokens"], "loss_type": "grpo"}
    cfg = GRPOConfig(steps=steps + warmup, prompts_per_step=s["prompts_per_step"], temperature=s["temperature"],
                     beta=s["beta"], optim=OptimConfig(lr=s["lr"]),
                     **{(k if k in fields else names[k]): v for k, v in values.items()})
    group, max_prompt = s["group_size"], s["max_prompt_len"]
    state = backend.init_train_state(backend.build(spec, spec.init_weights(0)), cfg.optim)
    ref_model = backend.build(spec, spec.init_weights(0)) if s["beta"] > 0 else None
    batches = batch_iterator(rows, cfg.prompts_per_step, cfg.seed)
    generated = trained = flops = 0.0
    phases: dict[str, float] = {}
    t0 = None
    for step in range(steps + warmup):
        if step == warmup:
            t0 = time.perf_counter()
        _, chunk = next(batches)
        state, m = grpo_step(backend, state, tok, reward_len, chunk, cfg, step, ref_model=ref_model)
        if step >= warmup:
            n = cfg.prompts_per_step * group
            generated += m["completion_length"] * n
            trained += m.get("tokens", 0.0)
            prompt_lens = [len(ids) for ids in encode_prompts(tok, [r["prompt"] for r in chunk], max_prompt)
                           for _ in range(group)]
            flops += discipline.grpo_step_flops(spec, prompt_lens, [m["completion_length"]] * n)
            for k, v in m.items():
                if k.startswith("time/"):
                    phases[k] = phases.get(k, 0.0) + v
    seconds = time.perf_counter() - t0
    return {"name": f"diptych-{name}", "seconds": seconds, "generated_tokens": generated, "trained_tokens": trained,
            "tokens_per_s": (generated + trained) / seconds, "model_flops": flops, "flops_per_s": flops / seconds,
            "phases_s": phases}


def step_matmuls(spec: Any, rows: int, prompt_len: int, new_tokens: int, reference: bool
                 ) -> list[tuple[int, int, int]]:
    """The ``(m, k, n)`` products of the linears (and the head) in one GRPO step at full padded width: prefill,
    ``new_tokens - 1`` decode steps of ``rows`` tokens, the policy's forward and backward (``dX`` and ``dW``) over
    ``prompt + completion``, and the reference forward when ``beta > 0``. Attention, norms, the optimizer and
    sampling are left out, so timing these products alone is a lower bound on any framework's fp32 step."""
    h, q, kv, inter = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.intermediate_size
    linears = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)] * spec.num_hidden_layers
    linears.append((h, spec.vocab_size))

    def fwd(m: int) -> list[tuple[int, int, int]]:
        return [(m, k, n) for k, n in linears]

    seq = rows * (prompt_len + new_tokens)
    out = fwd(rows * prompt_len) + fwd(rows) * (new_tokens - 1) + fwd(seq)
    out += [(seq, n, k) for k, n in linears] + [(k, seq, n) for k, n in linears]  # dX = dY W^T, dW = X^T dY
    return out + (fwd(seq) if reference else [])


def bench_matmul_floor(steps: int) -> dict[str, Any]:
    """``steps`` GRPO steps' linear products alone in torch fp32 (:func:`step_matmuls`), inputs preallocated."""
    import torch

    spec, _, _ = make_spec_and_rows()
    s = SHAPES
    shapes = step_matmuls(spec, s["prompts_per_step"] * s["group_size"], s["max_prompt_len"], s["max_new_tokens"],
                          s["beta"] > 0)
    gen = torch.Generator().manual_seed(0)
    cache = {shape: (torch.randn(shape[0], shape[1], generator=gen), torch.randn(shape[1], shape[2], generator=gen),
                     torch.empty(shape[0], shape[2])) for shape in set(shapes)}
    with torch.inference_mode():
        for a, b, o in cache.values():  # warm
            torch.mm(a, b, out=o)
        t0 = time.perf_counter()
        for _ in range(steps):
            for shape in shapes:
                a, b, o = cache[shape]
                torch.mm(a, b, out=o)
        seconds = time.perf_counter() - t0
    flops = sum(2.0 * m * k * n for m, k, n in shapes) * steps
    return {"name": "matmul-floor", "seconds": seconds, "step_s": seconds / steps, "products_per_step": len(shapes),
            "flops_per_step": flops / steps, "flops_per_s": flops / seconds}


def _hf_char_tokenizer(tok: Any, folder: Path) -> Any:
    """A PreTrainedTokenizerFast with exactly the CharTokenizer's ids (TRL needs an HF tokenizer)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": tok.pad_id, "<bos>": tok.bos_id, "<eos>": tok.eos_id}
    for i in range(tok.vocab_size):
        text = tok.decode([i])
        if text and text not in vocab and len(text) == 1:
            vocab[text] = i
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    fast.padding_side = "left"
    fast.save_pretrained(str(folder))
    return fast


def bench_trl(steps: int, warmup: int) -> dict[str, Any]:
    try:
        import datasets
        import trl
        from transformers import AutoModelForCausalLM, TrainerCallback
    except Exception as e:
        return {"name": "trl", "error": f"TRL is not importable here: {type(e).__name__}: {e}. Install it outside "
                                        "the venv: pip install --no-deps --target DIR trl accelerate datasets dill "
                                        "multiprocess xxhash pandas python-dateutil pytz tzdata; then --trl-path DIR."}
    from diptych.core.hf import save_hf_folder

    spec, tok, rows = make_spec_and_rows()
    s = SHAPES
    counts = {"generated": 0.0, "trained": 0.0, "flops": 0.0, "measuring": False}

    def reward(prompts: list[str], completions: list[Any], completion_ids: Any = None, **kw: Any) -> list[float]:
        if counts["measuring"]:
            lengths = [len(c) for c in completion_ids] if completion_ids is not None else [len(str(c)) for c in
                                                                                            completions]
            prompt_lens = [len(tok.encode(p)) for p in prompts]
            counts["generated"] += sum(lengths)
            counts["trained"] += sum(lengths) + sum(prompt_lens)
            mean = sum(lengths) / max(len(lengths), 1)  # the step's mean, as for diptych
            counts["flops"] += discipline.grpo_step_flops(spec, prompt_lens, [mean] * len(lengths))
        return reward_len(prompts, completions)

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.step, self.t0 = 0, None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.step == warmup:
                self.t0 = time.perf_counter()
                counts["measuring"] = True

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.step += 1

    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "model"
            save_hf_folder(folder, spec, spec.init_weights(0))
            hf_tok = _hf_char_tokenizer(tok, folder)
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32")
            ds = datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
            n = s["prompts_per_step"] * s["group_size"]
            args = trl.GRPOConfig(
                output_dir=str(Path(tmp) / "out"), per_device_train_batch_size=n, num_generations=s["group_size"],
                max_completion_length=s["max_new_tokens"], temperature=s["temperature"], learning_rate=s["lr"],
                beta=s["beta"], num_iterations=1, loss_type="grpo", max_steps=steps + warmup, use_cpu=True,
                report_to=[], logging_steps=1, save_strategy="no", dataloader_num_workers=0, seed=0,
                disable_tqdm=True)
            clock = Clock()
            trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds,
                                      processing_class=hf_tok, callbacks=[clock])
            trainer.train()
            seconds = time.perf_counter() - clock.t0
    except Exception as e:
        return {"name": "trl", "version": trl.__version__,
                "error": f"TRL GRPOTrainer failed: {type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=6)}
    return {"name": "trl", "version": trl.__version__, "seconds": seconds, "generated_tokens": counts["generated"],
            "trained_tokens": counts["trained"], "tokens_per_s": (counts["generated"] + counts["trained"]) / seconds,
            "model_flops": counts["flops"], "flops_per_s": counts["flops"] / seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=list(PRESETS), help="preset (see the module docstring)")
    p.add_argument("--prompts-per-step", type=int, help="override the preset")
    p.add_argument("--group-size", type=int, help="override the preset")
    p.add_argument("--max-new-tokens", type=int, help="override the preset")
    p.add_argument("--beta", type=float, help="KL coefficient, override the preset (> 0 puts a reference model in)")
    p.add_argument("--steps", type=int, default=5, help="measured GRPO steps per contender and round")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured first steps (compilation, caches)")
    p.add_argument("--backends", nargs="*", help="default: every installed backend")
    p.add_argument("--trl-path", type=Path, help="folder holding trl and its small deps (see the module docstring)")
    p.add_argument("--no-trl", action="store_true")
    p.add_argument("--roofline-n", type=int, default=2048, help="side of the fp32 matmul that measures the roofline")
    discipline.add_arguments(p)
    args = p.parse_args(argv)
    SHAPES.clear()
    SHAPES.update(PRESETS[args.shape])
    for key in ("prompts_per_step", "group_size", "max_new_tokens", "beta"):
        if getattr(args, key) is not None:
            SHAPES[key] = getattr(args, key)
    if args.trl_path:
        sys.path.insert(0, str(args.trl_path))
    from diptych.core.backend import available_backends

    spec, _, _ = make_spec_and_rows()
    config = {"shape": args.shape, "shapes": dict(SHAPES), "steps": args.steps, "warmup": args.warmup,
              "params": spec.num_params(), "matmul_params": discipline.matmul_params(spec),
              "metric": "(generated + trained tokens) / s and model FLOP/s; median round",
              "roofline_n": args.roofline_n}
    bench = discipline.Bench("grpo_throughput", args, config)
    contenders = {f"diptych-{n}": (lambda n=n: bench_diptych(n, args.steps, args.warmup))
                  for n in args.backends or available_backends()}
    if not args.no_trl:
        contenders["trl"] = lambda: bench_trl(args.steps, args.warmup)
    contenders["matmul-floor"] = lambda: bench_matmul_floor(args.steps)
    roof_backends = ["numpy", *sorted({ROOFLINE_OF[c] for c in contenders})]
    roof = bench.run({b: discipline.matmul_contender(b, args.roofline_n) for b in roof_backends}, "flops_per_s",
                     tag="roofline")
    res = bench.run(contenders, "tokens_per_s")
    results = []
    for name, r in res.items():
        if "tokens_per_s" in r:
            peak = roof[ROOFLINE_OF[name]]["flops_per_s"]
            r = {**r, "tokens_per_s_rounds": [x.get("tokens_per_s") for x in r["rounds"]],
                 "roofline_backend": ROOFLINE_OF[name], "roofline_flops_per_s": peak,
                 "flop_utilisation": r["flops_per_s"] / peak}
        results.append(r)
    trl_tps = res.get("trl", {}).get("tokens_per_s")
    table = [f"{args.shape}: hidden {SHAPES['hidden_size']}, {SHAPES['num_hidden_layers']} layers, "
             f"{SHAPES['prompts_per_step']} prompts x {SHAPES['group_size']}, {SHAPES['max_new_tokens']} new tokens, "
             f"beta {SHAPES['beta']}, "
             f"{args.steps} measured steps; matmul roofline GFLOP/s: "
             + ", ".join(f"{b} {roof[b]['flops_per_s'] / 1e9:.1f}" for b in roof_backends)]
    floor = res.get("matmul-floor", {})
    trl_s = res.get("trl", {}).get("seconds")
    if "step_s" in floor:
        line = (f"  matmul floor: {floor['step_s'] * 1e3:.1f} ms a step ({floor['products_per_step']} linear products "
                f"at {floor['flops_per_s'] / 1e9:.1f} GFLOP/s; attention, norms, optimizer and sampling excluded)")
        if trl_s:
            line += f"; TRL's step / 3 = {trl_s / args.steps / 3 * 1e3:.1f} ms"
        table.append(line)
    for r in results:
        if r.get("name") == "matmul-floor":
            continue
        if trl_tps and "tokens_per_s" in r:
            r["speedup_vs_trl"] = r["tokens_per_s"] / trl_tps
        line = f"{r['name']:>14}: " + (f"{r['tokens_per_s']:8.0f} tok/s  ({r['seconds']:.1f} s, "
                                        f"{r['generated_tokens']:.0f} generated + {r['trained_tokens']:.0f} trained)  "
                                        f"{r['flops_per_s'] / 1e9:.2f} GFLOP/s = {r['flop_utilisation']:.1%} of "
                                        f"{r['roofline_backend']} matmul"
                                        if "tokens_per_s" in r else r.get("error", "?"))
        if "speedup_vs_trl" in r:
            line += f"  x{r['speedup_vs_trl']:.2f} vs TRL"
        table.append(line)
    return bench.finish({"roofline": roof, "grpo": results}, table, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
