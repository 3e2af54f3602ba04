"""Trainer classes: the library API, and the one thing ``diptych train`` calls.

``GRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset=rows, backend="jax")``
then ``.train()`` is exactly what ``diptych train grpo`` runs: the CLI only builds these pieces
from YAML and flags. A trainer owns what the loops in ``sft.py`` / ``dpo.py`` / ``grpo.py`` /
``ppo.py`` must not: the frozen reference model (built only when the config's KL weight is > 0,
written once under the checkpoint root so a resumed run anchors its KL to the same weights), the
DPO reference cache, checkpoints and resume, and metrics logging.

Trainers are registered by name (``register_trainer``) with their contract: the config class, whether
they need a reward, which metrics to plot and whether a task's held-out accuracy means anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from diptych.core.backend import ADAPTER_DIR, AdaptersOff
from diptych.core.mesh import is_main_process, on_main_process
from diptych.core.trainers.base import DivergenceError, DivergenceGuard, TrainerError, evaluate, validate_rows
from diptych.core.trainers.dpo import DPOConfig, ReferenceCache, train_dpo
from diptych.core.trainers.grpo import GRPOConfig, check_columns, train_grpo
from diptych.core.trainers.ppo import PPOConfig, train_ppo
from diptych.core.trainers.runner import (
    CheckpointConfig,
    Checkpointer,
    RunLock,
    clean_orphans,
    clear_run,
    clear_stale_references,
    previous_run,
    run_segments,
    say,
    with_steps,
)
from diptych.core.trainers.sft import SFTConfig, train_sft
from diptych.rollout.engines import trainer_engine

TRAINERS: dict[str, type[Trainer]] = {}

FINAL_DIR = "final"
"""A LoRA run writes its merged model here under ``out`` (a Hugging Face folder), its adapters in ``final/adapter``."""


def register_trainer(name: str) -> Callable[[type[Trainer]], type[Trainer]]:
    """Class decorator adding a trainer under ``name`` (the CLI's ``diptych train <name>`` choices come from here)."""

    def deco(cls: type[Trainer]) -> type[Trainer]:
        if name in TRAINERS:
            raise KeyError(f"A trainer named {name!r} is already registered.")
        cls.name = name
        TRAINERS[name] = cls
        return cls

    return deco


def get_trainer(name: str) -> type[Trainer]:
    if name not in TRAINERS:
        raise KeyError(f"Unknown trainer {name!r}; registered: {', '.join(sorted(TRAINERS))}.")
    return TRAINERS[name]


class Trainer:
    """Shared run wiring; subclasses say how to start a state, prepare references and run a segment."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = object
    needs_reward: ClassVar[bool] = False
    """The trainer scores its own samples (GRPO, PPO): ``reward_funcs`` is required."""
    evaluates: ClassVar[bool] = False
    """Greedy accuracy under a task's verifier is meaningful before and after training."""
    plot_keys: ClassVar[tuple[str, ...]] = ("loss",)
    text_columns: ClassVar[tuple[str, ...]] = ("prompt",)
    """Columns every training row must have (checked for all rows before the first step)."""

    def __init__(self, model: Any = None, reward_funcs: Any = None, args: Any = None,
                 train_dataset: Sequence[dict[str, Any]] | None = None, backend: Any = None, tokenizer: Any = None,
                 out_dir: str | Path | None = None, eval_task: Any = None,
                 eval_dataset: Sequence[dict[str, Any]] | None = None, checkpoint: CheckpointConfig | None = None,
                 resume_from_checkpoint: bool = False, console: bool = False, run_config: Any = None,
                 overwrite: bool = False) -> None:
        from diptych.core.backend import get_backend
        from diptych.core.tokenizer import load_tokenizer

        self.args = args if args is not None else self.config_cls()
        if not isinstance(self.args, self.config_cls):
            raise TrainerError(f"{type(self).__name__} needs args={self.config_cls.__name__}(...), got "
                               f"{type(self.args).__name__}.")
        check_finite(self.args, self.name)
        self.backend = backend if backend is not None and not isinstance(backend, str) else get_backend(backend)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer("char")
        if train_dataset is None or not len(train_dataset):
            raise TrainerError(f"{type(self).__name__} needs train_dataset: a non-empty list of row dicts.")
        self.train_dataset = list(train_dataset)
        validate_rows(self.train_dataset, self.tokenizer, self.args.max_prompt_length, self.text_columns, self.name)
        self.reward = _reward(reward_funcs) if reward_funcs is not None else None
        if self.needs_reward:
            if self.reward is None:
                raise TrainerError(f"{type(self).__name__} needs reward_funcs (a task, a reward function, or "
                                   "registered reward names).")
            check_columns(self.reward, self.train_dataset)
        self.model = model
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.eval_task, self.eval_dataset = eval_task, list(eval_dataset or [])
        self.checkpoint = checkpoint or CheckpointConfig()
        self.resume = bool(resume_from_checkpoint)
        self.overwrite = bool(overwrite)
        self.console = console
        self.run_config = run_config if run_config is not None else {self.name: self.args}
        self.history: list[dict[str, float]] = []
        self.state: Any = None
        self.guard = DivergenceGuard(self.args.max_consecutive_skips)

    # -- what subclasses provide ----------------------------------------------------------------
    def init_state(self, model: Any) -> Any:
        return self.backend.init_train_state(self.policy(model), self.args.optim, seed=self.args.seed,
                                             **self.layout())

    def policy(self, model: Any) -> Any:
        """The model to train: ``model`` itself, or with ``args.lora`` set, ``model`` with adapters on its target
        linears (numpy init from ``args.seed``) and every base weight frozen."""
        lora = getattr(self.args, "lora", None)
        if lora is None:
            return model
        return self.backend.apply_lora(model, lora, seed=self.args.seed)

    @property
    def lora(self) -> Any:
        """The run's LoRA config (``args.lora``); None for full fine-tuning."""
        return getattr(self.args, "lora", None)

    def layout(self) -> dict[str, Any]:
        """Where the state lives (``mesh``; ``"auto"``: every device on fsdp) and ``remat``, from the config."""
        return {"mesh": getattr(self.args, "mesh", None) or "auto", "remat": getattr(self.args, "remat", None)}

    def prepare(self, state: Any, start: int) -> None:
        """Build what the run needs besides the policy (reference model or cache) before the first step."""

    def run(self, state: Any, start: int, end: int, logger: Any) -> Any:
        raise NotImplementedError

    @property
    def saves_inside(self) -> bool:
        """Whether :meth:`run` runs once for the whole run and saves the checkpoints itself (it then takes
        ``save=``, a :class:`diptych.core.trainers.runner.SavePoints`); otherwise it runs once per segment
        between save points."""
        return False

    # -- the run --------------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path | None:
        if self.checkpoint.dir:
            return Path(self.checkpoint.dir)
        return self.out_dir / "checkpoints" if self.out_dir is not None else None

    @property
    def run_dir(self) -> Path | None:
        """The folder the run lock lives in: ``out_dir``, else the checkpoint root."""
        return self.out_dir if self.out_dir is not None else self.checkpoint_root

    def train(self) -> dict[str, Any]:
        """Train to ``args.steps`` (resuming when asked) and return the final figures (last loss / reward,
        accuracy before and after when an eval task is given, the plot path).

        The run holds its directory's lock (:class:`RunLock`) throughout: a second run on the same ``out`` fails
        at once. A fresh run into a directory holding an earlier run's checkpoints or metrics is refused
        unless ``overwrite`` (which clears them first). A run whose steps keep diverging stops with
        :class:`DivergenceError` (``self.state`` is then the state at the stop).
        """
        lock = RunLock(self.run_dir) if self.run_dir is not None and is_main_process() else None  # rank 0
        if lock is not None:
            lock.acquire()
        try:
            with warnings.catch_warnings():
                # The divergence guard reports every skipped step (with the trainer step); the backend's own
                # once-per-location warning would repeat the first of them.
                warnings.filterwarnings("ignore", message="Skipping optimizer step", category=RuntimeWarning)
                return self._train()
        finally:
            if lock is not None:
                lock.release()

    def _train(self) -> dict[str, Any]:
        from diptych.core.metrics import MetricsLogger, plot_curves

        root = self.checkpoint_root
        clean_orphans(root)
        if not self.resume:
            used = previous_run(self.out_dir, root)
            if used and not self.overwrite:
                raise TrainerError(f"{self.run_dir} already holds a run ({'; '.join(used)}). Continue it with "
                                   "--resume (resume_from_checkpoint=True), replace it with --overwrite "
                                   "(overwrite=True), or choose another out.")
            if used:
                clear_run(self.out_dir, root)
                say(f"overwrite: cleared the earlier run in {self.run_dir}.")
        ckpt = (Checkpointer(self.backend, root, self.run_config, every=self.checkpoint.every,
                             keep_last=self.checkpoint.keep_last) if root is not None else None)
        start, state = 0, None
        if self.resume:
            check_lora_resume(ckpt, self.lora)
            restored = ckpt.restore_latest(mesh=self.layout()["mesh"]) if ckpt is not None else None
            if restored is None:
                say(f"resume: no checkpoint under {root}; starting fresh.")
            else:
                state, meta = restored
                start = int(meta["step"])
        if start == 0:
            clear_stale_references(root)
        if state is None:
            if self.model is None:
                raise TrainerError(f"{type(self).__name__} needs a model (backend.build(...)) unless it resumes "
                                   "from a checkpoint.")
            state = self.init_state(self.model)
        self.prepare(state, start)
        results: dict[str, Any] = {}
        can_eval = self.evaluates and self.eval_task is not None and bool(self.eval_dataset)
        if can_eval:
            results["accuracy_before"] = self._accuracy(state.model)
        metrics_path = self.out_dir / "metrics.jsonl" if self.out_dir is not None else None
        earlier = _keep_logged_steps(metrics_path, start) if start > 0 and metrics_path else []
        main = is_main_process()  # metrics, progress bar and plot on rank 0 only
        logger = MetricsLogger.for_run(self.out_dir if main else None, self.args.steps,
                                       f"{self.name} [{self.backend.name}]",
                                       console=self.console and main, append=start > 0)
        logger.history[:0] = earlier
        self.guard = DivergenceGuard(self.args.max_consecutive_skips)
        try:
            if self.saves_inside:
                def loop(st: Any, a: int, b: int, save: Any) -> Any:
                    return self.run(st, a, b, logger, save=save)  # type: ignore[call-arg]
            else:
                def loop(st: Any, a: int, b: int) -> Any:  # type: ignore[misc]
                    return self.run(st, a, b, logger)
            state = run_segments(loop, state, start, self.args.steps, ckpt, self.args.seed,
                                 saves_inside=self.saves_inside)
        except DivergenceError as e:
            self.state, self.history = e.state if e.state is not None else state, logger.history
            raise
        finally:
            logger.close()
        self.state, self.history = state, logger.history
        if self.lora is not None and self.out_dir is not None and main:
            results["final"] = str(self.save_final(state, self.out_dir / FINAL_DIR))
        if can_eval:
            results["accuracy_after"] = self._accuracy(state.model)
        plot = None
        if self.out_dir is not None and main:
            plot = plot_curves(logger.history, self.out_dir / "curves.png", keys=self.plot_keys,
                               title=f"diptych {self.name} ({self.backend.name})")
        if logger.history:
            last = logger.history[-1]
            results.update({k: float(last[k]) for k in ("reward", "loss") if k in last})
        results["steps"] = float(self.args.steps)
        results["plot"] = str(plot) if plot else None
        return results

    def _accuracy(self, model: Any) -> float:
        a = self.args
        return evaluate(self.backend, model, self.tokenizer, self.eval_task, self.eval_dataset, a.max_prompt_length,
                        a.max_completion_length)["accuracy"]

    def save_final(self, state: Any, folder: Path) -> Path:
        """A LoRA run's result: ``folder`` is a Hugging Face folder of the merged model (transformers and ``diptych
        sample`` load it as is) and ``folder/adapter`` the adapters alone in PEFT's format, for the base."""
        from diptych.core.hf import save_hf_folder
        from diptych.core.lora import save_adapter

        save_hf_folder(folder, state.model.spec, self.backend.export_weights(state))
        save_adapter(folder / ADAPTER_DIR, self.backend.export_adapters(state.model), self.lora)
        return folder

    def reference_model(self, state: Any, start: int) -> Any:
        """A frozen copy of the starting policy; written once under the checkpoint root (a Hugging Face
        folder) so a resumed run anchors its KL to the same reference, not to the restored policy.

        With LoRA the reference is the policy with its adapters off (:class:`AdaptersOff`): the frozen base,
        which every checkpoint stores, so nothing is copied, written or rebuilt."""
        if self.lora is not None:
            return AdaptersOff(state.model)
        root = self.checkpoint_root
        if root is None:  # export_weights: a sharded policy is gathered first
            return self.backend.build(state.model.spec, self.backend.export_weights(state))
        from diptych.core.hf import load_hf_folder, save_hf_folder

        folder = root / "reference"
        if (folder / "config.json").is_file():
            spec, weights = load_hf_folder(folder)
        elif start > 0:
            raise TrainerError(f"Cannot resume: the reference model {folder} is missing.")
        else:
            spec, weights = state.model.spec, self.backend.export_weights(state)
            on_main_process(lambda: save_hf_folder(folder, spec, weights))  # one writer; the others wait
        return self.backend.build(spec, weights)


@register_trainer("sft")
class SFTTrainer(Trainer):
    config_cls = SFTConfig
    evaluates = True
    text_columns = ("prompt", "completion")

    def run(self, state: Any, start: int, end: int, logger: Any) -> Any:
        return train_sft(self.backend, state, self.tokenizer, self.train_dataset, with_steps(self.args, end), logger,
                         start_step=start, guard=self.guard)


@register_trainer("dpo")
class DPOTrainer(Trainer):
    config_cls = DPOConfig
    plot_keys = ("loss", "rewards_accuracy")
    text_columns = ("prompt", "chosen", "rejected")
    ref_cache: ReferenceCache | None = None

    def prepare(self, state: Any, start: int) -> None:
        """The reference log-probs of every row, computed once from the starting policy and saved, so
        resume reloads them instead of keeping a reference model."""
        self.ref_cache = None
        if not self.args.needs_reference:
            return
        root = self.checkpoint_root
        path = root / "ref_logprobs.npz" if root is not None else None
        if path is not None and path.is_file():
            self.ref_cache = ReferenceCache.load(path, n_rows=len(self.train_dataset))
        elif start > 0:
            raise TrainerError(f"Cannot resume DPO: the reference cache {path} is missing.")
        else:
            ref = AdaptersOff(state.model) if self.lora is not None else state.model
            self.ref_cache = ReferenceCache.compute(self.backend, ref, self.tokenizer, self.train_dataset, self.args)
            if path is not None:
                on_main_process(lambda: self.ref_cache.save(path))

    def run(self, state: Any, start: int, end: int, logger: Any) -> Any:
        return train_dpo(self.backend, state, self.tokenizer, self.train_dataset, with_steps(self.args, end), logger,
                         ref_cache=self.ref_cache, start_step=start, guard=self.guard)


class _EngineOwner:
    """GRPO / PPO own their rollout engine (``rollout: native | vllm``, docs/vllm.md): started on the starting
    weights before the first step, closed when the run ends, however it ends (a server it started stops)."""

    engine: Any = None

    def open_engine(self, state: Any) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine = trainer_engine(self.args, self.backend, state.model, self.args.sampling(self.tokenizer))

    def train(self) -> dict[str, Any]:
        try:
            return super().train()  # type: ignore[misc]
        finally:
            if self.engine is not None:
                self.engine.close()


@register_trainer("grpo")
class GRPOTrainer(_EngineOwner, Trainer):
    config_cls = GRPOConfig
    needs_reward = True
    evaluates = True
    plot_keys = ("reward", "completion_length")
    ref_model: Any = None

    def prepare(self, state: Any, start: int) -> None:
        if self.args.async_.enabled:  # a generator process's imports overlap the evaluation before training
            from diptych.asyncrl.placement import prestart

            prestart(self.args, self.backend.name)
        self.ref_model = self.reference_model(state, start) if self.args.needs_reference else None
        self.open_engine(state)

    @property
    def saves_inside(self) -> bool:
        """An asynchronous run keeps one pipeline (one generator start) for the whole run and saves from inside."""
        return bool(self.args.async_.enabled)

    def run(self, state: Any, start: int, end: int, logger: Any, save: Any = None) -> Any:
        return train_grpo(self.backend, state, self.tokenizer, self.reward, self.train_dataset,
                          with_steps(self.args, end), logger, ref_model=self.ref_model, start_step=start,
                          guard=self.guard, engine=self.engine, save=save)


@register_trainer("ppo")
class PPOTrainer(_EngineOwner, Trainer):
    config_cls = PPOConfig
    needs_reward = True
    evaluates = True
    plot_keys = ("reward", "completion_length")
    ref_model: Any = None

    def init_state(self, model: Any) -> Any:
        return self.backend.init_train_state(self.policy(model), self.args.optim, seed=self.args.seed,
                                             value_head=True, **self.layout())

    def prepare(self, state: Any, start: int) -> None:
        self.ref_model = self.reference_model(state, start) if self.args.needs_reference else None
        self.open_engine(state)

    def run(self, state: Any, start: int, end: int, logger: Any) -> Any:
        return train_ppo(self.backend, state, self.tokenizer, self.reward, self.train_dataset,
                         with_steps(self.args, end), logger, ref_model=self.ref_model, start_step=start,
                         guard=self.guard, engine=self.engine)


def check_lora_resume(checkpointer: Any, lora: Any) -> None:
    """Refuse, before anything is restored, to resume a full fine-tuning checkpoint as a LoRA run or a LoRA
    checkpoint as a full one (or with other adapters): the trained weights would not be the ones continued."""
    from diptych.core import checkpointing as ckpt

    latest = checkpointer.latest() if checkpointer is not None else None
    if latest is None:
        return
    try:
        saved = ckpt.read_metadata(latest).get("lora")
    except (ckpt.CheckpointError, ValueError, OSError):
        return  # not intact: restore_latest says so and tries the previous one
    now = dataclasses.asdict(lora) if lora is not None else None
    # the checkpoint records the targets as resolved on the model (a recurrent model's defaults differ); a change of
    # targets is a config change, which the run-config check reports
    if saved is not None:
        saved = {k: v for k, v in saved.items() if k != "targets"}
    if now is not None:
        now = {k: v for k, v in now.items() if k != "targets"}
    if saved == now:
        return
    if saved is None:
        raise TrainerError(f"{latest} is a full fine-tuning checkpoint and this run sets lora; resume it without the "
                           "lora block, or start a fresh LoRA run (--overwrite or another out).")
    if now is None:
        raise TrainerError(f"{latest} is a LoRA checkpoint (lora {json.dumps(saved)}) and this run has no lora block; "
                           "resume with the same lora settings, or start a fresh run (--overwrite or another out).")
    raise TrainerError(f"{latest} was trained with lora {json.dumps(saved)}, this run sets lora {json.dumps(now)}; "
                       "resume with the checkpoint's lora settings, or start a fresh run.")


def _reward(reward_funcs: Any) -> Any:
    """A task (its ``reward``), a reward callable, registered reward names, or a list/dict of either."""
    if callable(reward_funcs) and not isinstance(reward_funcs, str):
        return reward_funcs
    from diptych.core.rewards import CombinedReward, get_reward

    if isinstance(reward_funcs, str):
        return get_reward(reward_funcs)
    if isinstance(reward_funcs, dict):
        return CombinedReward({k: get_reward(v) if isinstance(v, str) else v for k, v in reward_funcs.items()})
    if isinstance(reward_funcs, (list, tuple)):
        named = {}
        for i, r in enumerate(reward_funcs):
            key = r if isinstance(r, str) else getattr(r, "__name__", f"reward_{i}")
            named[key] = get_reward(r) if isinstance(r, str) else r
        return CombinedReward(named)
    raise TrainerError(f"reward_funcs must be a task, a callable, a registered reward name or a list of those; got "
                       f"{type(reward_funcs).__name__}.")


def check_finite(cfg: Any, prefix: str = "") -> None:
    """Every float setting of a trainer config must be finite (a NaN ``lr`` poisons the weights at the first step);
    ``from_dict`` checks YAML and flags, this checks configs built in Python too."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_finite(value, key)
        elif isinstance(value, (list, tuple)):
            for v in value:
                if isinstance(v, float) and not math.isfinite(v):
                    raise TrainerError(f"{key} must hold finite numbers, got {value!r}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise TrainerError(f"{key} must be a finite number, got {value!r}: a NaN or infinite setting would "
                               "poison the weights at the first step.")


def _keep_logged_steps(path: Path, start: int) -> list[dict[str, float]]:
    """On resume, drop metric rows of steps after the checkpoint (they will be redone) and return the rest."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r.get("step", 0) <= start]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return [{k: float(v) for k, v in r.items() if isinstance(v, (int, float))} for r in kept]
