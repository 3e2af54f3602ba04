"""`diptych quickstart`: the main job. A tiny decoder learns arithmetic, then RL makes it better.

From scratch, on a laptop CPU, in minutes: a char-level Llama-style decoder gets an SFT warm
start on the built-in ``arithmetic`` task (1-2 digit sums), then GRPO with the task's verifier
as the reward. Held-out accuracy (greedy, on prompts never seen in training) is measured before
and after GRPO; the gain is the point of the demo.

The warm-start data is deliberately flawed (``sft_carry_bug``): half of the sums that need a
carry are written by a teacher who forgets to carry, so greedy decoding inherits the habit
while sampling still finds the right answer often enough for GRPO to learn from. Why: with
clean SFT data the tiny model's held-out accuracy did not rise under GRPO in our measurements
(its errors are missing skill, which a 1-bit reward on ~once-seen prompts does not teach in
minutes); a systematic, generalisable bug is what RL with a verifier fixes, and it shows the
fix transfers to unseen prompts. Set ``sft_carry_bug=0`` for clean data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HELP = "SFT warm start then GRPO on the built-in arithmetic task"


@dataclass
class QuickstartConfig:
    seed: int = 0
    task: str = "arithmetic"
    task_knobs: dict[str, Any] = field(default_factory=lambda: {"digits": (1, 2), "ops": ("+",)})
    n_train: int = 4000
    n_test: int = 200
    hidden_size: int = 96
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    max_prompt_len: int = 12
    max_new_tokens: int = 6
    sft_steps: int = 800
    sft_batch: int = 64
    sft_lr: float = 3e-3
    grpo_steps: int = 150
    prompts_per_step: int = 16
    group_size: int = 8
    grpo_lr: float = 3e-4
    grpo_warmup: int = 10
    num_iterations: int = 1
    beta: float = 0.0
    loss: str = "grpo"
    temperature: float = 1.0
    sft_carry_bug: float = 0.5
    """Fraction of the carry-needing ``+`` answers in the SFT data written by a teacher who forgets to carry."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from diptych.core.backend import backend_names

    p.add_argument("--backend", choices=backend_names(), help="default: $DIPTYCH_BACKEND, else torch")
    p.add_argument("--json", type=Path, metavar="PATH", help="write {backend, accuracy_before, accuracy_after, ...}")
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"),
                   help="metrics JSONL, plot and the trained model (OUT/final) go here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft-steps", type=int, help="override the SFT warm-start length")
    p.add_argument("--grpo-steps", type=int, help="override the number of GRPO steps")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import os

    from diptych.core.backend import BackendError, get_backend

    name = args.backend or os.environ.get("DIPTYCH_BACKEND") or "torch"
    if name == "torch":
        # Tiny matmuls: torch's intra-op threads only contend (about 6x slower on 2 busy cores).
        import torch

        torch.set_num_threads(1)
    try:
        backend = get_backend(name)
    except BackendError as e:
        print(f"diptych quickstart: {e}", file=sys.stderr)
        return 2
    cfg = QuickstartConfig(seed=args.seed)
    if args.sft_steps is not None:
        cfg.sft_steps = args.sft_steps
    if args.grpo_steps is not None:
        cfg.grpo_steps = args.grpo_steps
    from diptych.core.trainers.runner import RunLock, RunLockError

    try:  # two quickstarts into one out would interleave metrics and replace each other's final/
        lock = RunLock(args.out).acquire() if args.out else None
    except RunLockError as e:
        print(f"diptych quickstart: {e}", file=sys.stderr)
        return 2
    try:
        result = quickstart(backend, cfg, out=args.out, console=not args.quiet)
    finally:
        if lock is not None:
            lock.release()
    print(f"\n[{result['backend']}] held-out accuracy: initial {result['accuracy_initial']:.1%} -> after SFT "
          f"{result['accuracy_before']:.1%} -> after GRPO {result['accuracy_after']:.1%} "
          f"(gain {result['accuracy_after'] - result['accuracy_before']:+.1%}) in {result['seconds']:.0f} s")
    if result.get("plot"):
        print(f"plot: {result['plot']}")
    if result.get("final"):
        print(next_steps(result["final"], result["backend"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def quickstart(backend: Any, cfg: QuickstartConfig, out: Path | None = None, console: bool = True
               ) -> dict[str, Any]:
    """Run the whole demo on ``backend`` and return its figures."""
    from diptych.core.metrics import MetricsLogger
    from diptych.core.optim import OptimConfig
    from diptych.core.spec import DecoderSpec
    from diptych.core.tasks import get_task
    from diptych.core.tokenizer import CharTokenizer
    from diptych.core.trainers.base import evaluate
    from diptych.core.trainers.grpo import GRPOConfig, train_grpo
    from diptych.core.trainers.sft import SFTConfig, train_sft

    t0 = time.perf_counter()
    tok = CharTokenizer()
    task = get_task(cfg.task, **cfg.task_knobs)
    train_rows = task.generate("train", cfg.n_train, cfg.seed)
    test_rows = task.generate("test", cfg.n_test, cfg.seed)
    spec = DecoderSpec(
        model_type="llama", vocab_size=tok.vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_prompt_len + cfg.max_new_tokens + 8, initializer_range=0.05,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
    )
    model = backend.build(spec, spec.init_weights(cfg.seed))

    def accuracy(m: Any) -> float:
        return evaluate(backend, m, tok, task, test_rows, cfg.max_prompt_len, cfg.max_new_tokens)["accuracy"]

    acc_initial = accuracy(model)
    sft_cfg = SFTConfig(steps=cfg.sft_steps, batch_size=cfg.sft_batch, max_prompt_length=cfg.max_prompt_len,
                        max_completion_length=cfg.max_new_tokens, seed=cfg.seed,
                        optim=OptimConfig(lr=cfg.sft_lr, warmup_steps=min(10, cfg.sft_steps // 10),
                                          total_steps=cfg.sft_steps, min_lr_ratio=0.1,
                                          schedule="cosine" if cfg.sft_steps > 0 else "constant"))
    sft_rows = warm_start_rows(task, train_rows, cfg.sft_carry_bug, cfg.seed)
    out_dir = Path(out) if out is not None else None
    log = MetricsLogger.for_run(out_dir / "sft" if out_dir else None, cfg.sft_steps, "SFT", console=console)
    state = train_sft(backend, backend.init_train_state(model, sft_cfg.optim, seed=cfg.seed), tok, sft_rows,
                      sft_cfg, log)
    log.close()
    acc_before = accuracy(state.model)

    grpo_cfg = GRPOConfig(steps=cfg.grpo_steps, prompts_per_step=cfg.prompts_per_step,
                          num_generations=cfg.group_size, max_prompt_length=cfg.max_prompt_len,
                          max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature,
                          loss_type=cfg.loss, beta=cfg.beta, seed=cfg.seed,
                          num_iterations=cfg.num_iterations,
                          optim=OptimConfig(lr=cfg.grpo_lr, max_grad_norm=1.0, warmup_steps=cfg.grpo_warmup))
    log = MetricsLogger.for_run(out_dir, cfg.grpo_steps, "GRPO", console=console)
    ref = state.model if cfg.beta > 0 else None
    state = train_grpo(backend, backend.init_train_state(state.model, grpo_cfg.optim, seed=cfg.seed), tok,
                       task.reward, train_rows, grpo_cfg, log, ref_model=ref)
    log.close()
    acc_after = accuracy(state.model)
    plot = final = None
    if out_dir is not None:
        plot = save_curves(log.history, out_dir, acc_initial, acc_before, acc_after,
                           title=f"diptych quickstart ({backend.name}): GRPO on {cfg.task}; "
                                 "points = held-out greedy accuracy")
        final = save_final(backend, state, spec, tok, out_dir / "final", eval_settings(cfg, acc_after, backend.name))
    return {
        "backend": backend.name,
        "accuracy_initial": acc_initial,
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "seconds": time.perf_counter() - t0,
        "reward_first": log.history[0].get("reward") if log.history else None,
        "reward_last": log.history[-1].get("reward") if log.history else None,
        "plot": str(plot) if plot else None,
        "final": str(final) if final else None,
    }


CURVE_LABELS = {"reward": "reward (fraction of sums right)",
                "completion_length": "completion length (tokens, incl. EOS)"}


def save_curves(history: list[dict[str, float]], out_dir: Path, acc_initial: float, acc_before: float,
                acc_after: float, title: str = "") -> Path | None:
    """``curves.png`` and the data drawn in it, ``curves.json``: GRPO reward and length, held-out accuracies marked.

    Accuracy is greedy and reward is sampled, but both are fractions of sums right, so the three
    evaluations sit on the reward panel: before and after SFT at step 0, after GRPO at the last step.
    """
    import dataclasses

    from diptych.core.plotting import Marker, curve_series, plot_series

    last = history[-1]["step"] if history else 0.0
    marks = {"reward": [Marker(0.0, acc_initial, "held-out, before SFT"),
                        Marker(0.0, acc_before, "held-out, after SFT"),
                        Marker(last, acc_after, "held-out, after GRPO")]}
    panels = curve_series(history, ("reward", "completion_length"), labels=CURVE_LABELS, markers=marks)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "curves.json").write_text(json.dumps([dataclasses.asdict(p) for p in panels]) + "\n")
    return plot_series(panels, out_dir / "curves.png", title=title, xlabel="GRPO optimizer step")


EVAL_FILE = "diptych_eval.json"
"""Written next to a saved model: which task, held-out rows and lengths reproduce its reported accuracy."""


def eval_settings(cfg: QuickstartConfig, accuracy: float, backend: str) -> dict[str, Any]:
    knobs = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.task_knobs.items()}
    return {"task": cfg.task, "task_knobs": knobs,
            "n": cfg.n_test, "seed": cfg.seed, "max_prompt_len": cfg.max_prompt_len,
            "max_new_tokens": cfg.max_new_tokens, "accuracy": accuracy, "backend": backend}


def save_final(backend: Any, state: Any, spec: Any, tokenizer: Any, folder: Path, settings: dict[str, Any]) -> Path:
    """``folder``: a Hugging Face folder (config, safetensors, tokenizer) plus ``folder/checkpoint`` (native state).

    The HF folder is what ``diptych sample|evaluate|convert`` and ``model.path=`` read on either
    backend; the native checkpoint keeps the optimizer state so training can continue exactly.
    """
    from diptych.core.hf import save_hf_folder
    from diptych.core.tokenizer import save_tokenizer

    weights = backend.export_weights(state)
    save_hf_folder(folder, spec, weights, extra_files={EVAL_FILE: json.dumps(settings, indent=2) + "\n"})
    save_tokenizer(tokenizer, folder)
    backend.save(state, folder / "checkpoint", metadata={"tokenizer": "char", "eval": settings})
    return folder


def next_steps(final: str | Path, backend: str) -> str:
    """The commands a new user runs next on the model just saved (printed at the end of the quickstart)."""
    final = Path(final)
    other = "jax" if backend == "torch" else "torch"
    return "\n".join([
        f"model: {final} (Hugging Face folder + tokenizer; native {backend} checkpoint in {final / 'checkpoint'})",
        "next:",
        f'  diptych sample --backend {backend} --checkpoint {final} --prompt "12+7=" --temperature 0',
        f"  diptych evaluate --backend {backend} --checkpoint {final}",
        f"  diptych convert {final / 'checkpoint'} {final.parent / ('final-' + other)} --to {other}",
    ])


def carry_free_sum(a: int, b: int) -> int:
    """``a + b`` as a pupil who forgets every carry writes it: each column's digit sum mod 10."""
    out, place = 0, 1
    while a or b:
        out += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out


def warm_start_rows(task: Any, rows: list[dict[str, Any]], carry_bug: float, seed: int) -> list[dict[str, str]]:
    """SFT ``{prompt, completion}`` rows; a ``carry_bug`` fraction of carry-needing sums get the carry-free answer.

    Real SFT data is imperfect, and a flawed teacher's habit is exactly what a verifier reward
    can remove: greedy decoding inherits the bug, sampling still finds the right answer often
    enough for GRPO to learn from, and the fix (carrying) generalises to unseen prompts.
    """
    import numpy as np

    rng = np.random.default_rng([seed, 7])
    out = []
    for r in rows:
        completion = task.reference_solution(r)
        buggy = carry_bug > 0 and r.get("op") == "+" and carry_free_sum(r["a"], r["b"]) != r["a"] + r["b"]
        if buggy and rng.random() < carry_bug:
            completion = str(carry_free_sum(r["a"], r["b"]))
        out.append({"prompt": r["prompt"], "completion": completion})
    return out
