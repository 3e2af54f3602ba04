"""`diptych train sft|dpo|grpo|ppo`: one typed run config, loaded from YAML and ``key=value`` flags.

A run config has four shared sections (``model``, ``data``, ``checkpoint``, ``out``) and one
section named after the trainer (``sft:``, ``dpo:``, ``grpo:``, ``ppo:``) holding that
trainer's dataclass config, so ``grpo.beta=0.04`` or ``grpo.optim.lr=1e-5`` override a
single value. Unknown keys are refused with the closest valid key.

Data comes from a built-in task (``data.task=arithmetic``; rows, verifier and reference
solutions are generated offline) or a JSONL file (``data.path=rows.jsonl``). The run writes
``metrics.jsonl``, ``curves.png`` and ``checkpoints/step_*`` under ``out``; ``--resume``
continues from the latest checkpoint there.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diptych.core.trainers.dpo import DPOConfig
from diptych.core.trainers.grpo import GRPOConfig
from diptych.core.trainers.ppo import PPOConfig
from diptych.core.trainers.runner import CheckpointConfig
from diptych.core.trainers.sft import SFTConfig

HELP = "train with sft | dpo | grpo | ppo from a YAML config and flags"
TRAINERS = ("sft", "dpo", "grpo", "ppo")
PLOT_KEYS = {"sft": ("loss",), "dpo": ("loss", "rewards_accuracy"), "grpo": ("reward", "completion_length"),
             "ppo": ("reward", "completion_length")}


@dataclass
class ModelSection:
    path: str | None = None
    """A local Hugging Face folder to start from; None trains a fresh decoder of the size below."""
    model_type: str = "llama"
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    initializer_range: float = 0.05
    seed: int = 0


@dataclass
class DataSection:
    task: str | None = "arithmetic"
    """Built-in task (rows, verifier, reference solutions); also the reward for JSONL prompts unless ``reward``."""
    task_knobs: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    """JSONL/JSON/Parquet rows instead of generated ones (sft: prompt, completion; dpo: prompt, chosen,
    rejected; grpo/ppo: prompt plus the columns the reward needs)."""
    reward: list[str] = field(default_factory=list)
    """Registered reward names (diptych.core.rewards) to combine instead of the task's verifier."""
    n_train: int = 2000
    n_test: int = 100
    tokenizer: str = "char"


def _run_config(name: str, trainer_cls: type) -> type:
    return dataclasses.make_dataclass(
        f"{name.upper()}Run",
        [("model", ModelSection, field(default_factory=ModelSection)),
         ("data", DataSection, field(default_factory=DataSection)),
         ("checkpoint", CheckpointConfig, field(default_factory=CheckpointConfig)),
         ("out", str, field(default=f"runs/{name}")),
         (name, trainer_cls, field(default_factory=trainer_cls))],
    )


RUN_CONFIGS: dict[str, type] = {
    "sft": _run_config("sft", SFTConfig), "dpo": _run_config("dpo", DPOConfig),
    "grpo": _run_config("grpo", GRPOConfig), "ppo": _run_config("ppo", PPOConfig),
}


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["jax", "torch"], help="default: $DIPTYCH_BACKEND")
    p.add_argument("--config", type=Path, help="YAML run config (see configs/)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from the latest checkpoint under out/checkpoints")
    p.add_argument("--quiet", action="store_true", default=None, help="no progress bar")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trainer", choices=TRAINERS)
    # argparse cannot mix options with a trailing nargs="*" positional, so everything after the
    # trainer name is re-parsed (intermixed) in run().
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="[--backend B] [--config YAML] [KEY=VALUE ...]",
                   help="options and overrides, e.g. --backend jax grpo.beta=0.04 data.task=countdown")
    _options(p)


def parse_rest(args: argparse.Namespace) -> argparse.Namespace:
    """Options given after the trainer name win over those given before it."""
    second = argparse.ArgumentParser(prog=f"diptych train {args.trainer}")
    _options(second)
    second.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    ns = second.parse_intermixed_args(getattr(args, "rest", None) or [])
    for key in ("backend", "config", "resume", "quiet"):
        if getattr(ns, key) is None:
            setattr(ns, key, getattr(args, key, None))
    ns.overrides = list(getattr(args, "overrides", None) or []) + list(ns.overrides)
    ns.trainer = args.trainer
    return ns


def run(args: argparse.Namespace) -> int:
    from diptych.core.backend import BackendError, get_backend
    from diptych.core.config import ConfigError, load_config

    args = parse_rest(args)
    try:
        cfg = load_config(RUN_CONFIGS[args.trainer], args.config, args.overrides)
        backend = get_backend(args.backend)
        result = train(args.trainer, backend, cfg, resume=bool(args.resume), console=not args.quiet)
    except (ConfigError, BackendError, ValueError, KeyError, FileNotFoundError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"diptych train {args.trainer}: {msg}", file=sys.stderr)
        return 2
    summary = "  ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float))
    print(f"[{backend.name}] {args.trainer} done: {summary}")
    if result.get("plot"):
        print(f"metrics: {Path(cfg.out) / 'metrics.jsonl'}  plot: {result['plot']}")
    return 0


# -- building the pieces --------------------------------------------------------------------------
def build_model(backend: Any, cfg: Any, tokenizer: Any) -> Any:
    from diptych.core.hf import load_hf_folder
    from diptych.core.spec import DecoderSpec

    m = cfg.model
    if m.path:
        spec, weights = load_hf_folder(m.path)
        if spec.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"model.path has vocab_size {spec.vocab_size} < the tokenizer's {tokenizer.vocab_size}.")
        return backend.build(spec, weights)
    width = _width(cfg)
    spec = DecoderSpec(model_type=m.model_type, vocab_size=tokenizer.vocab_size, hidden_size=m.hidden_size,
                       num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
                       num_key_value_heads=m.num_key_value_heads, intermediate_size=m.intermediate_size,
                       max_position_embeddings=width + 8, initializer_range=m.initializer_range,
                       bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return backend.build(spec, spec.init_weights(m.seed))


def _width(cfg: Any) -> int:
    t = _trainer_cfg(cfg)
    tail = getattr(t, "max_new_tokens", None) or t.max_completion_len
    return t.max_prompt_len + tail


def _trainer_cfg(cfg: Any) -> Any:
    return next(getattr(cfg, n) for n in TRAINERS if hasattr(cfg, n))


def load_rows(kind: str, cfg: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Any]:
    """``(train_rows, test_rows, task or None)`` in the shape trainer ``kind`` needs."""
    from diptych.core.data import PreferenceDataset, PromptDataset, read_rows
    from diptych.core.tasks import get_task

    d = cfg.data
    task = get_task(d.task, **{k: _literal(v) for k, v in d.task_knobs.items()}) if d.task else None
    if d.path:
        if kind == "dpo":
            return list(PreferenceDataset(d.path)), [], task
        if kind == "sft":
            rows, where = read_rows(d.path)
            missing = {"prompt", "completion"} - set(rows[0] if rows else {})
            if missing:
                raise ValueError(f"{where}: SFT rows need columns prompt and completion; missing "
                                 f"{', '.join(sorted(missing))}.")
            return rows, [], task
        return list(PromptDataset(d.path)), [], task
    if task is None:
        raise ValueError("Set data.task (a built-in task) or data.path (a JSONL file).")
    seed = _trainer_cfg(cfg).seed
    train, test = task.generate("train", d.n_train, seed), task.generate("test", d.n_test, seed)
    if kind == "sft":
        train = [{"prompt": r["prompt"], "completion": task.reference_solution(r)} for r in train]
    elif kind == "dpo":
        train = task_preferences(task, train, seed)
    return train, test, task


def _literal(value: Any) -> Any:
    """``key=value`` flags arrive as strings; task knobs are free-form, so read them as YAML scalars/lists."""
    import yaml

    return yaml.safe_load(value) if isinstance(value, str) else value


def task_preferences(task: Any, rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Preference pairs from a verifiable task: the reference solution is chosen, the reference
    solution of another problem (one the verifier rejects here) is rejected."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for r in rows:
        chosen = task.reference_solution(r)
        for _ in range(10):
            other = task.reference_solution(rows[int(rng.integers(len(rows)))])
            cols = {c: [r[c]] for c in task.required_columns}
            if other != chosen and not task.reward([r["prompt"]], [other], **cols)[0]:
                out.append({"prompt": r["prompt"], "chosen": chosen, "rejected": other})
                break
    return out


def build_reward(cfg: Any, task: Any) -> Any:
    from diptych.core.rewards import CombinedReward, get_reward

    if cfg.data.reward:
        return CombinedReward({name: get_reward(name) for name in cfg.data.reward})
    if task is None:
        raise ValueError("grpo/ppo need a reward: set data.task (its verifier) or data.reward=[names].")
    return task


# -- the run --------------------------------------------------------------------------------------
def train(kind: str, backend: Any, cfg: Any, resume: bool = False, console: bool = True) -> dict[str, Any]:
    """Run trainer ``kind`` on ``backend`` with run config ``cfg``; returns final figures."""
    from diptych.core.metrics import MetricsLogger, plot_curves
    from diptych.core.tokenizer import load_tokenizer
    from diptych.core.trainers.base import evaluate
    from diptych.core.trainers.runner import Checkpointer

    tcfg = _trainer_cfg(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    train_rows, test_rows, task = load_rows(kind, cfg)
    reward = build_reward(cfg, task) if kind in ("grpo", "ppo") else None
    if reward is not None:
        from diptych.core.trainers.grpo import check_columns

        check_columns(reward, train_rows)
    out = Path(cfg.out)
    ckpt = Checkpointer(backend, Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else out / "checkpoints", cfg,
                        every=cfg.checkpoint.every, keep_last=cfg.checkpoint.keep_last)
    start, state = 0, None
    if resume:
        restored = ckpt.restore_latest()
        if restored is None:
            print(f"--resume: no checkpoint under {ckpt.root}; starting fresh.", file=sys.stderr)
        else:
            state, meta = restored
            start = int(meta["step"])
    model = state.model if state is not None else build_model(backend, cfg, tokenizer)
    results: dict[str, Any] = {}
    can_eval = task is not None and test_rows and kind in ("sft", "grpo", "ppo")
    width_new = getattr(tcfg, "max_new_tokens", None) or tcfg.max_completion_len

    def accuracy(m: Any) -> float:
        return evaluate(backend, m, tokenizer, task, test_rows, tcfg.max_prompt_len, width_new)["accuracy"]

    if can_eval:
        results["accuracy_before"] = accuracy(model)
    earlier = _keep_logged_steps(out / "metrics.jsonl", start) if start > 0 else []
    logger = MetricsLogger.for_run(out, tcfg.steps, f"{kind} [{backend.name}]", console=console, append=start > 0)
    logger.history[:0] = earlier
    try:
        state = _run_loop(kind, backend, state, model, tokenizer, train_rows, reward, tcfg, logger, ckpt, start, out)
    finally:
        logger.close()
    if can_eval:
        results["accuracy_after"] = accuracy(state.model)
    plot = plot_curves(logger.history, out / "curves.png", keys=PLOT_KEYS[kind],
                       title=f"diptych {kind} ({backend.name})")
    if logger.history:
        last = logger.history[-1]
        results.update({k: float(last[k]) for k in ("reward", "loss") if k in last})
    results["steps"] = float(tcfg.steps)
    results["plot"] = str(plot) if plot else None
    return results


def _keep_logged_steps(path: Path, start: int) -> list[dict[str, float]]:
    """On resume, drop metric rows of steps after the checkpoint (they will be redone) and return the rest."""
    import json

    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r.get("step", 0) <= start]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return [{k: float(v) for k, v in r.items() if isinstance(v, (int, float))} for r in kept]


def _run_loop(kind: str, backend: Any, state: Any, model: Any, tokenizer: Any, rows: list[dict[str, Any]],
              reward: Any, tcfg: Any, logger: Any, ckpt: Any, start: int, out: Path) -> Any:
    from diptych.core.trainers.runner import run_segments, with_steps

    if state is None:
        state = backend.init_train_state(model, tcfg.optim, seed=tcfg.seed, **({"value_head": True}
                                         if kind == "ppo" and tcfg.value_head else {}))
    if kind == "sft":
        from diptych.core.trainers.sft import train_sft

        def loop(st: Any, a: int, b: int) -> Any:
            return train_sft(backend, st, tokenizer, rows, with_steps(tcfg, b), logger, start_step=a)
    elif kind == "dpo":
        from diptych.core.trainers.dpo import ReferenceCache, train_dpo

        cache = None
        if tcfg.needs_reference:
            path = ckpt.root / "ref_logprobs.npz"
            if path.is_file():
                cache = ReferenceCache.load(path, n_rows=len(rows))
            elif start > 0:
                raise ValueError(f"Cannot resume DPO: the reference cache {path} is missing.")
            else:
                cache = ReferenceCache.compute(backend, state.model, tokenizer, rows, tcfg)
                cache.save(path)

        def loop(st: Any, a: int, b: int) -> Any:
            return train_dpo(backend, st, tokenizer, rows, with_steps(tcfg, b), logger, ref_cache=cache, start_step=a)
    elif kind == "grpo":
        from diptych.core.trainers.grpo import train_grpo

        ref = _reference(backend, state, ckpt.root, start) if tcfg.beta > 0 else None

        def loop(st: Any, a: int, b: int) -> Any:
            return train_grpo(backend, st, tokenizer, reward, rows, with_steps(tcfg, b), logger, ref_model=ref,
                              start_step=a)
    else:
        from diptych.core.trainers.ppo import train_ppo

        ref = _reference(backend, state, ckpt.root, start) if tcfg.kl_coef > 0 else None

        def loop(st: Any, a: int, b: int) -> Any:
            return train_ppo(backend, st, tokenizer, reward, rows, with_steps(tcfg, b), logger, ref_model=ref,
                             start_step=a)
    return run_segments(loop, state, start, tcfg.steps, ckpt, tcfg.seed)


def _reference(backend: Any, state: Any, root: Path, start: int) -> Any:
    """A frozen copy of the starting policy, built only when a KL term needs it.

    Its weights are written once (a Hugging Face folder under the checkpoint root) so a
    resumed run anchors its KL to the same reference, not to the restored policy.
    """
    from diptych.core.hf import load_hf_folder, save_hf_folder

    folder = root / "reference"
    if (folder / "config.json").is_file():
        spec, weights = load_hf_folder(folder)
    elif start > 0:
        raise ValueError(f"Cannot resume: the reference model {folder} is missing.")
    else:
        spec, weights = state.model.spec, backend.export(state.model)
        save_hf_folder(folder, spec, weights)
    return backend.build(spec, weights)
