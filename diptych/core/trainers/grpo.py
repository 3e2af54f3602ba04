"""GRPO and its variants (Dr.GRPO, DAPO, GSPO, BNPO) as one backend-neutral loop.

One step (DeepSeekMath; DESIGN.md "Data flow of one GRPO step"):

1. ``prompts_per_step`` prompts, each sampled ``num_generations`` times by ``backend.generate``;
2. completions decoded and scored by the reward (per component, for logging);
3. group advantages from ``diptych.core.advantages`` (``grpo`` z-score by default), with
   zero-variance groups optionally dropped (DAPO dynamic sampling);
4. reference log-probs only when ``beta > 0``;
5. ``num_iterations`` optimizer passes over the batch with the ``policy`` loss; with more than
   one pass the old log-probs are recomputed by the trainer on the first pass's weights, with one
   pass they are the train step's own detached log-probs (no extra forward).

The loop owns no framework code: swapping ``backend`` swaps the panel, not the algorithm. The step is
written as phases (:func:`sample_rollout`, :func:`score_rollout`, :func:`advantage_batch`, :func:`train_on_batch`)
so that with ``async.enabled`` the same phases run as a generator, verifiers and a trainer that overlap
(``diptych.asyncrl``, docs/async_rl.md); with ``async.max_staleness=0`` that run equals this loop bit for bit.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from diptych.asyncrl.config import AsyncConfig
from diptych.core.advantages import ESTIMATORS, compute_advantages, filter_zero_variance_groups, get_estimator
from diptych.core.config import from_dict, with_renamed_fields
from diptych.core.lora import LoRAConfig
from diptych.core.losses import POLICY_PRESETS, PolicyLossConfig, policy_preset
from diptych.core.losses.trajectory import TrajectoryCredit
from diptych.core.mesh import MeshConfig
from diptych.core.metrics import MetricsLogger
from diptych.core.optim import OptimConfig
from diptych.core.sampling import Rollout, SamplingConfig, parity_noise
from diptych.core.train_batch import split_microbatches
from diptych.core.trainers.base import (
    DivergenceGuard,
    StepTimer,
    TrainerError,
    batch_iterator,
    check_loop_fields,
    columns_of,
    decode_completions,
    diverged,
    encode_prompts,
    finite_on_mask,
    loop_guard,
    rollout_batch,
    sequence_logprobs,
)
from diptych.recurrent.training import DepthPolicy
from diptych.rollout.base import VLLMConfig, check_rollout_config, push_weights, sample_with, sync_metrics


@dataclass
class GRPOLoss:
    """Field-by-field overrides of the ``loss_type`` preset's policy loss; None keeps the preset's value.

    Names follow TRL's GRPOConfig where the knob is the same (``epsilon``, ``epsilon_high``,
    ``importance_sampling_level``); the rest are diptych's (``diptych.core.losses.PolicyLossConfig``).
    As in TRL, ``epsilon_high`` defaults to ``epsilon`` when only ``epsilon`` is set. The KL weight is
    not here: it is ``GRPOConfig.beta``, the one place that also decides whether a reference model exists.
    """

    epsilon: float | None = None
    """Lower clip (PolicyLossConfig.eps_low)."""
    epsilon_high: float | None = None
    """Upper clip (PolicyLossConfig.eps_high; DAPO's clip-higher)."""
    importance_sampling_level: Literal["token", "sequence"] | None = None
    """``sequence`` is GSPO's ratio (PolicyLossConfig.ratio_level)."""
    kl_estimator: Literal["k1", "k2", "k3"] | None = None
    dual_clip: float | None = None
    entropy_coef: float | None = None
    tis_cap: float | None = None
    """Truncated importance-sampling cap on exp(logp_old - logp_sampler)."""
    aggregation: str | None = None
    norm_length: int | None = None
    """Dr.GRPO's constant normaliser; default: max_completion_length."""

    _renamed: ClassVar[dict[str, str]] = {"eps_low": "epsilon", "eps_high": "epsilon_high",
                                          "ratio_level": "importance_sampling_level"}
    _to_policy: ClassVar[dict[str, str]] = {"epsilon": "eps_low", "epsilon_high": "eps_high",
                                            "importance_sampling_level": "ratio_level"}

    def policy_overrides(self) -> dict[str, Any]:
        """The set fields in PolicyLossConfig's names."""
        out = {self._to_policy.get(f.name, f.name): getattr(self, f.name) for f in dataclasses.fields(self)
               if getattr(self, f.name) is not None}
        if self.epsilon is not None and self.epsilon_high is None:
            out["eps_high"] = self.epsilon
        return out


ADVANTAGE_SCALES = ("group", "batch", "none")


@with_renamed_fields
@dataclass
class GRPOConfig:
    """Defaults follow TRL's GRPOConfig where it is sensible for a small model (NOTES.md); see
    docs/coming_from_trl.md for every field's TRL name and default.

    ``beta`` is the one home of the KL weight: None takes the ``loss_type`` preset's (0.04 for
    ``grpo``, 0 for the others), and the reference model exists exactly when it is > 0.
    """

    steps: int = 50
    prompts_per_step: int = 16
    num_generations: int = 8
    """Completions per prompt (the group size G)."""
    micro_batches: int = 1
    num_iterations: int = 1
    max_prompt_length: int = 32
    max_completion_length: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    loss_type: str = "dapo"
    """Policy-loss preset: grpo | dr_grpo | dapo | gspo | bnpo (diptych.core.losses.POLICY_PRESETS); TRL's default."""
    loss: GRPOLoss | str = field(default_factory=GRPOLoss)
    """Overrides of the preset, field by field (``grpo.loss.epsilon_high=0.28``)."""
    beta: float | None = None
    advantage: str = "grpo"
    """Advantage estimator registered in diptych.core.advantages (grpo | dr_grpo | rloo | reinforce_pp)."""
    scale_rewards: str = "group"
    """``grpo`` estimator: divide by the group std (``group``), the batch std (``batch``) or not (``none``)."""
    advantage_baseline: str = "none"
    """``reinforce_pp`` estimator: ``group`` subtracts the group mean before whitening (REINFORCE++-baseline)."""
    filter_zero_variance: bool = False
    parity: bool = False
    """Draw sampling noise from one numpy stream so both backends sample identical tokens."""
    seed: int = 0
    max_consecutive_skips: int = 3
    """Stop the run (DivergenceError) after this many steps in a row skipped for a non-finite loss or gradient."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))
    mesh: MeshConfig | None = None
    """Devices ``{data, fsdp, tensor}`` (``diptych.core.mesh``); None: every local device (JAX) or the whole
    ``torchrun`` job, on ``fsdp``."""
    remat: Literal["none", "layer"] = "none"
    """Activation checkpointing: ``layer`` recomputes each decoder layer in the backward."""
    lora: LoRAConfig | None = None
    """Adapters (``diptych.core.lora``): ``lora: {r: 16, alpha: 32}`` trains LoRA on a frozen base, ``quantize_base:
    nf4`` QLoRA; None trains every weight."""
    async_: AsyncConfig = field(default_factory=AsyncConfig)
    """Asynchronous RL (``diptych.asyncrl``), written ``async`` in YAML and flags: ``async.enabled=true
    async.max_staleness=2``."""
    depth: DepthPolicy | None = None
    """Recurrent-depth models only: the train depth schedule (truncated backprop) and the sampling depth."""
    rollout: str = "native"
    """Who samples: ``native`` (the backend's own sampler) or ``vllm`` (docs/vllm.md)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """The vLLM engine when ``rollout: vllm``: mode (colocated | server), memory bound, server url."""
    trajectory: TrajectoryCredit | None = None
    """Recurrent-depth models only: credit over the latent trajectory (RLTT, ``diptych.core.losses.trajectory``);
    None or ``weighting="final"`` is plain GRPO on the final iteration."""
    loss_overrides: dict[str, Any] = field(default_factory=dict)
    """Deprecated: use ``loss`` (typed fields) and ``beta``."""

    _renamed: ClassVar[dict[str, str]] = {"group_size": "num_generations", "max_prompt_len": "max_prompt_length",
                                          "max_new_tokens": "max_completion_length"}
    _keys: ClassVar[dict[str, str]] = {"async": "async_"}

    def __post_init__(self) -> None:
        check_loop_fields(self)
        if isinstance(self.loss, str):
            warnings.warn("GRPOConfig.loss as a preset name is deprecated; use loss_type (TRL's name); loss now "
                          "holds field-by-field overrides.", DeprecationWarning, stacklevel=4)
            self.loss_type, self.loss = self.loss, GRPOLoss()
        if self.loss_type not in POLICY_PRESETS:
            raise TrainerError(f"loss_type must be one of {', '.join(sorted(POLICY_PRESETS))}, got {self.loss_type!r}.")
        if self.loss_overrides:
            warnings.warn("GRPOConfig.loss_overrides is deprecated; set grpo.loss.<field> (typed) and grpo.beta.",
                          DeprecationWarning, stacklevel=4)
            over = dict(self.loss_overrides)
            self.loss_overrides = {}
            if "beta" in over:
                beta = over.pop("beta")
                if self.beta is None:
                    self.beta = float(beta)
            over.pop("allow_empty_sequences", None)
            known = {**{f.name: getattr(self.loss, f.name) for f in dataclasses.fields(GRPOLoss)
                        if getattr(self.loss, f.name) is not None}}
            over = {GRPOLoss._renamed.get(k, k): v for k, v in over.items()}  # PolicyLossConfig's names
            self.loss = from_dict(GRPOLoss, {**known, **over}, prefix="loss_overrides.")
        if self.beta is None:
            self.beta = POLICY_PRESETS[self.loss_type].beta
        if self.beta < 0:
            raise TrainerError(f"beta must be >= 0, got {self.beta}.")
        if self.num_generations < 2:
            raise TrainerError(f"num_generations must be >= 2 for group-relative advantages, got "
                               f"{self.num_generations}.")
        rows = self.prompts_per_step * self.num_generations
        if rows % self.micro_batches:
            raise TrainerError(
                f"prompts_per_step x num_generations = {rows} rollouts do not split into micro_batches="
                f"{self.micro_batches}; choose micro_batches dividing {rows}."
            )
        if self.num_iterations < 1:
            raise TrainerError(f"num_iterations must be >= 1, got {self.num_iterations}.")
        est = get_estimator(self.advantage) if self.advantage in ESTIMATORS else None
        if est is None or "values" in est.needs:
            choices = ", ".join(sorted(n for n, e in ESTIMATORS.items() if "values" not in e.needs))
            raise TrainerError(f"advantage must be a group estimator ({choices}), got {self.advantage!r}"
                               + (" (it needs a critic: use PPO)." if est is not None else "."))
        if self.scale_rewards not in ADVANTAGE_SCALES:
            raise TrainerError(f"scale_rewards must be one of {', '.join(ADVANTAGE_SCALES)}, got "
                               f"{self.scale_rewards!r}.")
        for opt, value, default in (("scale", self.scale_rewards, "group"),
                                    ("baseline", self.advantage_baseline, "none")):
            if value != default and opt not in est.options:
                name = "scale_rewards" if opt == "scale" else "advantage_baseline"
                raise TrainerError(f"{name}={value!r} has no effect with advantage={self.advantage!r} (it takes "
                                   f"{', '.join(est.options) or 'no options'}); drop it or change the estimator.")
        self.vllm = check_rollout_config(self.rollout, self.vllm, parity=self.parity, depth=self.depth)
        self.loss_config()  # validate the loss now, not mid-run
        if self.async_.enabled:
            from diptych.asyncrl.orchestrator import check_async

            check_async(self)
        if self.trajectory is not None and self.trajectory.loss_config(self.loss_config()).per_iteration \
                and self.num_iterations > 1:
            raise TrainerError(f"trajectory.weighting={self.trajectory.weighting!r} is on-policy (RLTT): set "
                               "num_iterations=1, or weighting='final' with successive_kl=0.")

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0

    def advantage_kwargs(self) -> dict[str, Any]:
        opts = get_estimator(self.advantage).options
        return {k: v for k, v in (("scale", self.scale_rewards), ("baseline", self.advantage_baseline)) if k in opts}

    def loss_config(self) -> PolicyLossConfig:
        """The preset with this run's beta and loss overrides; dropped groups leave empty rows, which the loss
        must skip; Dr.GRPO's constant normaliser defaults to the longest possible completion."""
        overrides: dict[str, Any] = {"beta": self.beta}
        if self.filter_zero_variance:
            overrides["allow_empty_sequences"] = True
        if self.loss_type == "dr_grpo":
            overrides["norm_length"] = self.max_completion_length
        return policy_preset(self.loss_type, **{**overrides, **self.loss.policy_overrides()})

    def train_loss(self, loss_cfg: PolicyLossConfig) -> tuple[str, Any]:
        """The registered loss and its config the train step runs: ``policy``, or ``trajectory`` when set."""
        if self.trajectory is None:
            return "policy", loss_cfg
        return "trajectory", self.trajectory.loss_config(loss_cfg)

    def sampling(self, tokenizer: Any) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_completion_length, temperature=self.temperature,
                              top_k=self.top_k, top_p=self.top_p, min_p=self.min_p, n=self.num_generations,
                              eos_ids=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)


RewardFn = Callable[..., Sequence[float | None]]


def score(reward: Any, prompts: list[str], completions: list[str], columns: dict[str, list[Any]]
          ) -> tuple[np.ndarray, dict[str, float]]:
    """Rewards as float array plus per-component means; accepts a task verifier or CombinedReward."""
    out = reward(prompts, completions, **columns)
    if hasattr(out, "total"):
        comps = {f"reward/{k}": float(np.nanmean(v)) if np.isfinite(v).any() else 0.0
                 for k, v in out.components.items()}
        comps["reward/failures"] = float(getattr(out, "failures", 0))
        return np.asarray(out.total, np.float32), comps
    return np.asarray([0.0 if r is None else float(r) for r in out], np.float32), {}


def check_columns(reward: Any, rows: Sequence[dict[str, Any]]) -> None:
    """Fail before training when a reward needs a dataset column that the rows lack."""
    needed = set(getattr(reward, "required_columns", ()) or ())
    if rows and needed - set(rows[0]):
        missing = sorted(needed - set(rows[0]))
        raise TrainerError(f"The reward needs column(s) {', '.join(missing)}, which the dataset rows lack "
                           f"(they have {', '.join(sorted(rows[0]))}).")


def sample_rollout(backend: Any, model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], cfg: GRPOConfig,
                   step: int, engine: Any = None) -> Rollout:
    """Phase 1: ``num_generations`` completions of every prompt of ``rows``, drawn from ``model`` (or ``engine``) with
    the step's seed, so a generator elsewhere (``diptych.asyncrl``) draws exactly what the synchronous loop draws."""
    ids = encode_prompts(tokenizer, [r["prompt"] for r in rows], cfg.max_prompt_length)
    sampling = cfg.sampling(tokenizer)
    if engine is not None:
        return sample_with(engine, ids, sampling, cfg.seed * 100003 + step)
    noise = None
    if cfg.parity:
        noise = parity_noise(len(ids) * cfg.num_generations, cfg.max_completion_length, int(model.spec.vocab_size),
                             seed=cfg.seed * 100003 + step)
    return backend.generate(model, ids, sampling, noise=noise,
                            **({} if cfg.parity else {"seed": cfg.seed * 100003 + step}),
                            **(cfg.depth.generate_kwargs() if cfg.depth is not None else {}))


def score_rollout(tokenizer: Any, reward: Any, rows: Sequence[dict[str, Any]], rollout: Rollout, cfg: GRPOConfig
                  ) -> tuple[np.ndarray, dict[str, float]]:
    """Phase 2 (the verifier's): each completion's reward, and the per-component means for logging."""
    g = cfg.num_generations
    completions = decode_completions(tokenizer, rollout)
    return score(reward, [r["prompt"] for r in rows for _ in range(g)], completions,
                 {**columns_of(list(rows), exclude=("prompt",), repeat=g),
                  "completion_lengths": [int(x) for x in rollout.lengths]})


def advantage_batch(batch: dict[str, np.ndarray], rewards: np.ndarray, cfg: GRPOConfig
                    ) -> tuple[dict[str, np.ndarray], int]:
    """Phase 3: group advantages of whole groups (rows ``i * G .. i * G + G - 1``) and DAPO's zero-variance filter
    on the policy-loss arrays of :func:`rollout_batch`; returns the batch and how many groups the filter dropped."""
    g = cfg.num_generations
    batch = dict(batch)
    batch["advantages"] = compute_advantages(cfg.advantage, rewards, g, **cfg.advantage_kwargs()).astype(np.float32)
    dropped = 0
    if cfg.filter_zero_variance:
        keep, dropped = filter_zero_variance_groups(rewards, g)
        batch["mask"] = batch["mask"] * keep[:, None].astype(np.float32)
    return batch, int(dropped)


def train_on_batch(backend: Any, state: Any, batch: dict[str, np.ndarray], cfg: GRPOConfig, step: int,
                   ref_model: Any = None, timer: StepTimer | None = None, loss: tuple[str, Any] | None = None
                   ) -> tuple[Any, dict[str, float]]:
    """Phase 4: ``num_iterations`` optimizer passes on a scored batch (the trainer role's whole job).

    ``loss`` replaces the registered loss and config the config asks for (``cfg.train_loss``): the asynchronous
    trainer passes the off-policy correction. The metrics are the train step's (``skipped`` when the batch has no
    token to learn from); phase times go to ``timer``."""
    timer = timer if timer is not None else StepTimer()
    metrics: dict[str, float] = {}
    if not batch["mask"].any():
        metrics["skipped"] = 1.0
        return state, metrics
    loss_cfg = cfg.loss_config()
    if cfg.depth is not None and cfg.depth.schedule is not None:  # old, ref and trained log-probs at depth r
        r, k = cfg.depth.train_depth(step)
        backend.set_depth(state.model, r, k)
        if ref_model is not None:
            backend.set_depth(ref_model, r)
    with timer.phase("train"):
        gap = None
        if cfg.num_iterations > 1:
            # Later passes need the first pass's log-probs; with one pass the train step's own detached
            # log-probs are the old ones (same loss and gradient, one forward fewer; TRL does the same).
            lp_old = sequence_logprobs(backend, state.model, batch["tokens"], batch["attention_mask"], batch["mask"],
                                       cfg.temperature)
            if not finite_on_mask(batch["mask"], lp_old):
                return state, diverged(metrics, "old log-probs")
            batch["old_logprobs"] = lp_old
            diff = np.abs(lp_old - batch["sampler_logprobs"])[batch["mask"] > 0]
            gap = float(diff.max()) if diff.size else 0.0
        if cfg.needs_reference:
            if ref_model is None:
                raise TrainerError(f"beta={cfg.beta} (> 0) needs a reference model: pass ref_model, use GRPOTrainer "
                                   "(it builds one), or set beta=0.")
            batch["ref_logprobs"] = sequence_logprobs(backend, ref_model, batch["tokens"], batch["attention_mask"],
                                                     batch["mask"], cfg.temperature)
        name, config = loss if loss is not None else cfg.train_loss(loss_cfg)
        for _ in range(cfg.num_iterations):
            state, metrics = backend.train_step(state, split_microbatches(batch, cfg.micro_batches), name, config,
                                                temperature=cfg.temperature)
    metrics = dict(metrics)
    if gap is not None:  # the gap at the weights that sampled, not after the last pass
        metrics["sampler_logprob_gap"] = gap
    return state, metrics


def grpo_step(backend: Any, state: Any, tokenizer: Any, reward: Any, rows: list[dict[str, Any]], cfg: GRPOConfig,
              step: int, ref_model: Any = None, engine: Any = None) -> tuple[Any, dict[str, float]]:
    """One GRPO step on ``rows`` (a batch of prompts): generate, score, advantages, update.

    ``engine`` (a ``diptych.rollout`` engine, e.g. vLLM) samples instead of ``backend.generate`` and gets the
    updated weights pushed after the update (``time/sync``; ``weight_version`` is the version that sampled)."""
    timer = StepTimer()
    with timer.phase("generate"):
        rollout = sample_rollout(backend, state.model, tokenizer, rows, cfg, step, engine)
    with timer.phase("score"):
        rewards, components = score_rollout(tokenizer, reward, rows, rollout, cfg)
        batch, dropped = advantage_batch(rollout_batch(rollout, cfg.max_prompt_length), rewards, cfg)
    metrics: dict[str, float] = {
        "reward": float(rewards.mean()), "reward_std": float(rewards.std()),
        "completion_length": float(rollout.lengths.mean()), "truncated_frac": float(rollout.truncated.mean()),
        "groups_dropped": float(dropped), **components,
    }
    if engine is not None:
        metrics["weight_version"] = float(rollout.extras["weight_version"])
    state, train_metrics = train_on_batch(backend, state, batch, cfg, step, ref_model, timer)
    metrics.update(train_metrics)
    if train_metrics.get("skipped") and ("loss" not in train_metrics or "skip_reason" in train_metrics):
        # Nothing to learn from, or a diverged forward before the update: no update, so no sync either.
        metrics.update(timer.metrics())
        return state, metrics
    if engine is not None:
        with timer.phase("sync"):
            push_weights(engine, backend, state)
        metrics.update(sync_metrics(engine))
    metrics.update(timer.metrics())
    total_time = sum(timer.seconds.values())
    metrics["tokens_per_s"] = float(batch["attention_mask"].sum()) / max(total_time, 1e-9)
    return state, metrics


def state_vocab(state: Any) -> int:
    return int(state.model.spec.vocab_size)


def train_grpo(backend: Any, state: Any, tokenizer: Any, reward: Any, rows: Sequence[dict[str, Any]],
               cfg: GRPOConfig, logger: MetricsLogger | None = None, ref_model: Any = None,
               start_step: int = 0, on_step: Callable[[int, Any, dict[str, float]], None] | None = None,
               guard: DivergenceGuard | None = None, engine: Any = None,
               save: Callable[[int, Any], None] | None = None) -> Any:
    """Run GRPO from ``start_step`` to ``cfg.steps``; ``on_step`` may checkpoint or evaluate.

    ``engine``: a rollout engine (``diptych.rollout``) that samples instead of the backend; it is first synced to
    ``state`` so it never samples with other weights. ``save``: called ``save(step, state)`` after every step
    (``diptych.core.trainers.runner.SavePoints``: it writes the checkpoints of the save points), so an
    asynchronous run saves from inside its one pipeline instead of being split at every checkpoint."""
    check_columns(reward, rows)
    guard = loop_guard(guard, cfg)
    if cfg.async_.enabled:
        return _train_async(backend, state, tokenizer, reward, rows, cfg, logger, ref_model, start_step, on_step,
                            guard, engine, save)
    batches = batch_iterator(rows, cfg.prompts_per_step, cfg.seed, start=start_step)
    if engine is not None and start_step < cfg.steps:
        push_weights(engine, backend, state)
    for step in range(start_step, cfg.steps):
        _, chunk = next(batches)
        state, metrics = grpo_step(backend, state, tokenizer, reward, chunk, cfg, step, ref_model, engine)
        if logger is not None:
            logger.log(step + 1, metrics)
        guard.check(step + 1, metrics, state)
        if on_step is not None:
            on_step(step + 1, state, metrics)
        if save is not None:
            save(step + 1, state)
    return state


def _train_async(backend: Any, state: Any, tokenizer: Any, reward: Any, rows: Sequence[dict[str, Any]],
                 cfg: GRPOConfig, logger: MetricsLogger | None, ref_model: Any, start_step: int,
                 on_step: Callable[[int, Any, dict[str, float]], None] | None, guard: DivergenceGuard, engine: Any,
                 save: Callable[[int, Any], None] | None = None) -> Any:
    """``async.enabled``: the same phases, run by a generator, verifiers and a trainer (``diptych.asyncrl``)."""
    from diptych.asyncrl.orchestrator import Phases, check_async, train_grpo_async

    check_async(cfg, engine)
    phases = Phases(sample=sample_rollout, score=score, advantages=advantage_batch, train=train_on_batch)
    return train_grpo_async(backend, state, tokenizer, reward, rows, cfg, phases, logger, ref_model, start_step,
                            on_step, guard, save=save)
