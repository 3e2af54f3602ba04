"""GRPO throughput: diptych (each installed backend) vs TRL's GRPOTrainer, same model and shapes, one run.

Every contender trains the same tiny Llama (same numpy-initialised weights, char vocabulary)
with the same prompts, batch (prompts x group size), completion length, temperature,
loss (GRPO, beta 0, one optimizer pass per batch) and a trivial reward, so the figure
measured is the framework's generate + score + train loop. Throughput is
``(generated tokens + trained tokens) / seconds`` over the measured steps (the first
``--warmup`` steps, which include compilation, are excluded for everyone).

TRL is optional and never downloaded here: ``--trl-path DIR`` prepends a folder where
``pip install --no-deps --target DIR trl accelerate datasets dill multiprocess xxhash
pandas python-dateutil pytz tzdata`` put it (kept out of the project venv so torch is
never replaced). If TRL cannot be imported or run, the JSON says why.

    python benchmarks/grpo_throughput.py --json benchmarks/results/grpo_throughput.json --trl-path /tmp/trl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

SHAPES = {"prompts_per_step": 8, "group_size": 4, "max_prompt_len": 12, "max_new_tokens": 16, "temperature": 1.0,
          "lr": 1e-5, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 128}


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
                       max_position_embeddings=64, initializer_range=0.05, bos_token_id=tok.bos_id,
                       eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    rows = get_task("arithmetic", digits=2, ops=("+",)).generate("train", 512, seed)
    return spec, tok, rows


def bench_diptych(name: str, steps: int, warmup: int) -> dict[str, Any]:
    from diptych.core.backend import get_backend
    from diptych.core.optim import OptimConfig
    from diptych.core.trainers.base import batch_iterator
    from diptych.core.trainers.grpo import GRPOConfig, grpo_step

    backend = get_backend(name)
    spec, tok, rows = make_spec_and_rows()
    s = SHAPES
    cfg = GRPOConfig(steps=steps + warmup, prompts_per_step=s["prompts_per_step"], group_size=s["group_size"],
                     max_prompt_len=s["max_prompt_len"], max_new_tokens=s["max_new_tokens"],
                     temperature=s["temperature"], loss="grpo", beta=0.0, optim=OptimConfig(lr=s["lr"]))
    state = backend.init_train_state(backend.build(spec, spec.init_weights(0)), cfg.optim)
    batches = batch_iterator(rows, cfg.prompts_per_step, cfg.seed)
    generated = trained = 0.0
    phases: dict[str, float] = {}
    t0 = None
    for step in range(steps + warmup):
        if step == warmup:
            t0 = time.perf_counter()
        _, chunk = next(batches)
        state, m = grpo_step(backend, state, tok, reward_len, chunk, cfg, step)
        if step >= warmup:
            n = cfg.prompts_per_step * cfg.group_size
            generated += m["completion_length"] * n
            trained += m.get("tokens", 0.0)
            for k, v in m.items():
                if k.startswith("time/"):
                    phases[k] = phases.get(k, 0.0) + v
    seconds = time.perf_counter() - t0
    return {"name": f"diptych-{name}", "seconds": seconds, "generated_tokens": generated, "trained_tokens": trained,
            "tokens_per_s": (generated + trained) / seconds, "phases_s": phases}


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
    counts = {"generated": 0.0, "trained": 0.0, "measuring": False}

    def reward(prompts: list[str], completions: list[Any], completion_ids: Any = None, **kw: Any) -> list[float]:
        if counts["measuring"]:
            lengths = [len(c) for c in completion_ids] if completion_ids is not None else [len(str(c)) for c in
                                                                                            completions]
            counts["generated"] += sum(lengths)
            counts["trained"] += sum(lengths) + sum(len(tok.encode(p)) for p in prompts)
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
                beta=0.0, num_iterations=1, loss_type="grpo", max_steps=steps + warmup, use_cpu=True,
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
            "trained_tokens": counts["trained"], "tokens_per_s": (counts["generated"] + counts["trained"]) / seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, metavar="PATH", help="write the figures here")
    p.add_argument("--steps", type=int, default=5, help="measured GRPO steps per contender")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured first steps (compilation, caches)")
    p.add_argument("--backends", nargs="*", help="default: every installed backend")
    p.add_argument("--trl-path", type=Path, help="folder holding trl and its small deps (see the module docstring)")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds; the best round is reported")
    p.add_argument("--no-trl", action="store_true")
    args = p.parse_args(argv)
    if args.trl_path:
        sys.path.insert(0, str(args.trl_path))
    from diptych.core.backend import available_backends

    contenders = [(f"diptych-{n}", lambda n=n: bench_diptych(n, args.steps, args.warmup))
                  for n in args.backends or available_backends()]
    if not args.no_trl:
        contenders.append(("trl", lambda: bench_trl(args.steps, args.warmup)))
    # The CPU is shared: contenders alternate round by round and the best round counts (median kept too).
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in contenders}
    for rnd in range(args.repeats):
        for name, fn in contenders:
            print(f"round {rnd + 1}/{args.repeats}: {name} ...", flush=True)
            runs[name].append(fn())
    results = []
    for rs in runs.values():
        ok = [r for r in rs if "tokens_per_s" in r]
        if not ok:
            results.append(rs[-1])
            continue
        best = max(ok, key=lambda r: r["tokens_per_s"])
        results.append({**best, "tokens_per_s_median": float(np.median([r["tokens_per_s"] for r in ok])),
                        "tokens_per_s_rounds": [r["tokens_per_s"] for r in ok]})
    trl_tps = next((r.get("tokens_per_s") for r in results if r["name"] == "trl"), None)
    for r in results:
        if trl_tps and "tokens_per_s" in r:
            r["speedup_vs_trl"] = r["tokens_per_s"] / trl_tps
        line = f"{r['name']:>14}: " + (f"{r['tokens_per_s']:8.0f} tok/s  ({r['seconds']:.1f} s, "
                                        f"{r['generated_tokens']:.0f} generated + {r['trained_tokens']:.0f} trained)"
                                        if "tokens_per_s" in r else r.get("error", "?"))
        if "speedup_vs_trl" in r:
            line += f"  x{r['speedup_vs_trl']:.2f} vs TRL"
        print(line)
    report = {"benchmark": "grpo_throughput", "shapes": SHAPES, "steps": args.steps, "warmup": args.warmup,
              "repeats": args.repeats, "metric": "(generated + trained tokens) / s, best of the rounds",
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
              "load_average": os.getloadavg(), "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
