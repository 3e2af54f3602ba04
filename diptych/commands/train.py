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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diptych.core.trainers.api import TRAINERS, get_trainer
from diptych.core.trainers.runner import CheckpointConfig

HELP = "train with " + " | ".join(TRAINERS) + " from a YAML config and flags"


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


RUN_CONFIGS: dict[str, type] = {name: _run_config(name, cls.config_cls) for name, cls in TRAINERS.items()}


def _options(p: argparse.ArgumentParser) -> None:
    from diptych.core.backend import backend_names

    p.add_argument("--backend", choices=backend_names(), help="default: $DIPTYCH_BACKEND")
    p.add_argument("--config", type=Path, help="YAML run config (see configs/)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from the latest checkpoint under out/checkpoints")
    p.add_argument("--quiet", action="store_true", default=None, help="no progress bar")
    p.add_argument("--mesh", metavar="AXIS=N,...",
                   help="devices over data, fsdp, tensor, e.g. fsdp=4,tensor=2 (default: all on fsdp)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an earlier run in out (its checkpoints and metrics) instead of refusing")
    p.add_argument("--debug", action="store_true", default=None, help="show the traceback of an error")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trainer", choices=list(TRAINERS))
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
    for key in ("backend", "config", "resume", "quiet", "mesh", "overwrite", "debug"):
        if getattr(ns, key) is None:
            setattr(ns, key, getattr(args, key, None))
    ns.overrides = list(getattr(args, "overrides", None) or []) + list(ns.overrides)
    ns.trainer = args.trainer
    return ns


def mesh_overrides(args: argparse.Namespace) -> list[str]:
    """``--mesh fsdp=4,tensor=2`` as config overrides of ``<trainer>.mesh`` (checked by ``MeshConfig``)."""
    from diptych.core.mesh import MeshConfig

    if not getattr(args, "mesh", None):
        return []
    return [f"{args.trainer}.mesh.{axis}={size}" for axis, size in MeshConfig.parse(args.mesh).as_dict().items()]


def trainer_overrides(trainer: str, overrides: list[str]) -> list[str]:
    """A flag naming a field of the trainer's section without the section (``async.enabled=true``,
    ``lora.r=8``) is that section's field (``grpo.async.enabled=true``): the issue-style spelling, never a
    guess (only exact field names of the trainer config that no run section shares)."""
    cls = TRAINERS[trainer].config_cls
    fields = {f.name for f in dataclasses.fields(cls)} | set(getattr(cls, "_keys", {}))
    sections = {f.name for f in dataclasses.fields(RUN_CONFIGS[trainer])}
    out = []
    for item in overrides:
        head = item.split("=", 1)[0].strip().split(".", 1)[0]
        out.append(f"{trainer}.{item.strip()}" if head in fields and head not in sections else item)
    return out


def run(args: argparse.Namespace) -> int:
    from diptych.core.backend import BackendError, get_backend, resolve_backend_name
    from diptych.core.config import ConfigError, load_config
    from diptych.core.trainers.base import DivergenceError

    args = parse_rest(args)
    debug = bool(getattr(args, "debug", False))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", DeprecationWarning)  # old config names: tell the user, once per key
            overrides = trainer_overrides(args.trainer, args.overrides) + mesh_overrides(args)
            cfg = load_config(RUN_CONFIGS[args.trainer], args.config, overrides)
        if args.trainer == "grpo" and cfg.grpo.async_.enabled:  # a generator process's imports overlap our set-up
            from diptych.asyncrl.placement import prestart

            prestart(cfg.grpo, resolve_backend_name(args.backend))
        backend = get_backend(args.backend)
        if backend.name == "jax":  # a multi-host job (DIPTYCH_COORDINATOR, ...) must join before any JAX call
            from diptych.backends.jax import sharding

            sharding.initialize()
        result = train(args.trainer, backend, cfg, resume=bool(args.resume), console=not args.quiet,
                       overwrite=bool(args.overwrite))
    except DivergenceError as e:  # the run itself failed (not its input): exit 1
        if debug:
            raise
        print(f"diptych train {args.trainer}: {e}", file=sys.stderr)
        return 1
    except (ConfigError, BackendError, ValueError, KeyError, FileNotFoundError, TypeError) as e:
        if debug:
            raise
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
    return t.max_prompt_length + t.max_completion_length


def _trainer_cfg(cfg: Any) -> Any:
    return next(getattr(cfg, n) for n in TRAINERS if n in {f.name for f in dataclasses.fields(cfg)})


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
    if cfg.data.reward:
        from diptych.core.rewards import CombinedReward, get_reward

        return CombinedReward({name: get_reward(name) for name in cfg.data.reward})
    if task is None:
        raise ValueError("grpo/ppo need a reward: set data.task (its verifier) or data.reward=[names].")
    return task


# -- the run --------------------------------------------------------------------------------------
def train(kind: str, backend: Any, cfg: Any, resume: bool = False, console: bool = True,
          overwrite: bool = False) -> dict[str, Any]:
    """Run trainer ``kind`` on ``backend`` with run config ``cfg``: build the pieces, call the trainer class."""
    from diptych.core import checkpointing as ckpt
    from diptych.core.tokenizer import load_tokenizer

    cls = get_trainer(kind)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    train_rows, test_rows, task = load_rows(kind, cfg)
    reward = build_reward(cfg, task) if cls.needs_reward else None
    root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.out) / "checkpoints"
    restoring = resume and ckpt.latest_checkpoint(root) is not None
    model = None if restoring else build_model(backend, cfg, tokenizer)
    trainer = cls(model, reward, args=_trainer_cfg(cfg), train_dataset=train_rows, backend=backend,
                  tokenizer=tokenizer, out_dir=cfg.out, eval_task=task, eval_dataset=test_rows,
                  checkpoint=cfg.checkpoint, resume_from_checkpoint=resume, console=console, run_config=cfg,
                  overwrite=overwrite)
    return trainer.train()
