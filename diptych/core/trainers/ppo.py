"""PPO for language models (InstructGPT / TRL style) as one backend-neutral loop.

One step:

1. ``prompts_per_step`` prompts, each sampled ``num_generations`` times;
2. completions scored by the reward (one number per sequence);
3. old log-probs and values from the current policy and its value head, reference
   log-probs from the frozen reference when ``kl_coef > 0``;
4. per-token rewards with the KL in the reward (``-kl_coef * KL_t`` on every token, k1 by
   default, the sequence reward on its last token), then GAE (``gamma``, ``lam``) and
   whitened advantages (``diptych.core.advantages``);
5. ``num_ppo_epochs`` optimizer passes with ``policy + vf_coef * value`` (clipped ratio, clipped
   values). During the first ``value_warmup_steps`` steps the loss is the value loss alone, so
   a freshly initialised critic stops producing noise advantages before the policy-gradient
   term starts (the value head shares the trunk, so its gradient reaches the trunk too).

The value head sits on the policy (``init_train_state(..., value_head=True)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from diptych.core.advantages import gae, kl_shaped_rewards
from diptych.core.config import with_renamed_fields
from diptych.core.lora import LoRAConfig
from diptych.core.losses import PolicyLossConfig, ValueLossConfig
from diptych.core.mesh import MeshConfig
from diptych.core.metrics import MetricsLogger
from diptych.core.optim import OptimConfig
from diptych.core.sampling import SamplingConfig, parity_noise
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
from diptych.core.trainers.grpo import check_columns, score
from diptych.rollout.base import VLLMConfig, check_rollout_config, push_weights, sample_with, sync_metrics


@with_renamed_fields
@dataclass
class PPOConfig:
    """Defaults follow TRL's PPO (NOTES.md): 4 epochs, k1 KL in the reward at 0.05, clip 0.2, vf_coef 0.1.

    The critic is a value head on the policy (a separate critic model is not implemented); the
    reference model exists exactly when ``kl_coef > 0``.
    """

    steps: int = 50
    prompts_per_step: int = 16
    num_generations: int = 1
    micro_batches: int = 1
    num_ppo_epochs: int = 4
    max_prompt_length: int = 32
    max_completion_length: int = 32
    temperature: float = 1.0
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    value_warmup_steps: int = 0
    parity: bool = False
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
    rollout: str = "native"
    """Who samples: ``native`` (the backend's own sampler) or ``vllm`` (docs/vllm.md)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """The vLLM engine when ``rollout: vllm``: mode (colocated | server), memory bound, server url."""

    _renamed: ClassVar[dict[str, str]] = {"samples_per_prompt": "num_generations", "ppo_epochs": "num_ppo_epochs",
                                          "max_prompt_len": "max_prompt_length",
                                          "max_new_tokens": "max_completion_length", "value_clip": "cliprange_value"}

    def __post_init__(self) -> None:
        check_loop_fields(self)
        rows = self.prompts_per_step * self.num_generations
        if rows % self.micro_batches:
            raise TrainerError(f"prompts_per_step x num_generations = {rows} rollouts do not split into "
                               f"micro_batches={self.micro_batches}; choose micro_batches dividing {rows}.")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise TrainerError(f"kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}.")
        if self.num_ppo_epochs < 1 or self.value_warmup_steps < 0:
            raise TrainerError("num_ppo_epochs must be >= 1 and value_warmup_steps >= 0.")
        if rows < 2 and self.whiten_advantages:
            raise TrainerError("Whitening advantages needs at least 2 rollouts per step.")
        self.vllm = check_rollout_config(self.rollout, self.vllm, parity=self.parity)

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    def loss(self, warmup: bool) -> tuple[Any, Any]:
        value = ValueLossConfig(clip=self.cliprange_value if self.cliprange_value > 0 else None)
        if warmup:
            return "value", value
        policy = PolicyLossConfig(eps_low=self.cliprange, eps_high=self.cliprange, beta=0.0)
        return {"policy": 1.0, "value": self.vf_coef}, {"policy": policy, "value": value}

    def sampling(self, tokenizer: Any) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_completion_length, temperature=self.temperature,
                              n=self.num_generations, eos_ids=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)


def values_of(backend: Any, state: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
    """Value-head predictions ``[B, T-1]`` (position t: the state that emits target t + 1), zero off the mask."""
    fn = getattr(backend, "values", None)
    if fn is None:
        raise TrainerError(f"Backend {backend.name!r} has no values(state, tokens, attention_mask); PPO needs it.")
    out = fn(state, backend.from_numpy(batch["tokens"]), backend.from_numpy(batch["attention_mask"]))
    return np.asarray(backend.to_numpy(out), np.float32) * batch["mask"]


def ppo_step(backend: Any, state: Any, tokenizer: Any, reward: Any, rows: list[dict[str, Any]], cfg: PPOConfig,
             step: int, ref_model: Any = None, engine: Any = None) -> tuple[Any, dict[str, float]]:
    """One PPO step on ``rows``: generate, score, KL-shaped rewards, GAE, ``num_ppo_epochs`` updates.

    ``engine`` (a ``diptych.rollout`` engine, e.g. vLLM) samples instead of ``backend.generate`` and gets the
    updated weights pushed after the updates."""
    timer = StepTimer()
    n = cfg.num_generations
    prompts = [r["prompt"] for r in rows]
    ids = encode_prompts(tokenizer, prompts, cfg.max_prompt_length)
    with timer.phase("generate"):
        if engine is not None:
            rollout = sample_with(engine, ids, cfg.sampling(tokenizer), cfg.seed * 100003 + step)
        else:
            noise = None
            if cfg.parity:
                noise = parity_noise(len(ids) * n, cfg.max_completion_length, int(state.model.spec.vocab_size),
                                     seed=cfg.seed * 100003 + step)
            rollout = backend.generate(state.model, ids, cfg.sampling(tokenizer), noise=noise,
                                       **({} if cfg.parity else {"seed": cfg.seed * 100003 + step}))
    with timer.phase("score"):
        completions = decode_completions(tokenizer, rollout)
        rewards, components = score(reward, [p for p in prompts for _ in range(n)], completions,
                                    {**columns_of(rows, exclude=("prompt",), repeat=n),
                                     "completion_lengths": [int(x) for x in rollout.lengths]})
        batch = rollout_batch(rollout, cfg.max_prompt_length)
        mask = batch["mask"]
    metrics: dict[str, float] = {
        "reward": float(rewards.mean()), "reward_std": float(rewards.std()),
        "completion_length": float(rollout.lengths.mean()), "truncated_frac": float(rollout.truncated.mean()),
        **components,
    }
    if engine is not None:
        metrics["weight_version"] = float(rollout.extras["weight_version"])
    if not mask.any():
        metrics.update(skipped=1.0, **timer.metrics())
        return state, metrics
    warmup = step < cfg.value_warmup_steps
    with timer.phase("train"):
        old_lp = sequence_logprobs(backend, state.model, batch["tokens"], batch["attention_mask"], batch["mask"],
                                   cfg.temperature)
        values = values_of(backend, state, batch)
        if not finite_on_mask(mask, old_lp, values):
            return state, diverged(metrics, "old log-probs or values", timer)
        if cfg.kl_coef > 0:
            if ref_model is None:
                raise TrainerError("kl_coef > 0 needs a reference model; pass ref_model (or set kl_coef=0).")
            ref_lp = sequence_logprobs(backend, ref_model, batch["tokens"], batch["attention_mask"], batch["mask"],
                                   cfg.temperature)
        else:
            ref_lp = old_lp
        token_rewards = kl_shaped_rewards(rewards, old_lp, ref_lp, mask, cfg.kl_coef, cfg.kl_estimator)
        adv, returns = gae(token_rewards, values, mask, cfg.gamma, cfg.lam,
                           whiten_advantages=cfg.whiten_advantages and mask.sum() >= 2)
        batch.update(old_logprobs=old_lp, advantages=adv.astype(np.float32), old_values=values,
                     returns=returns.astype(np.float32))
        loss, loss_cfg = cfg.loss(warmup)
        train_metrics: dict[str, float] = {}
        for _ in range(cfg.num_ppo_epochs):
            state, train_metrics = backend.train_step(state, split_microbatches(batch, cfg.micro_batches), loss,
                                                      loss_cfg, temperature=cfg.temperature)
    m = mask > 0
    metrics["kl"] = float((old_lp - ref_lp)[m].sum() / len(rows) / n)
    metrics["value_mean"] = float(values[m].mean())
    metrics["returns_mean"] = float(returns[m].mean())
    metrics["value_warmup"] = float(warmup)
    metrics.update(train_metrics)
    # the worst sampler/trainer gap at the weights that sampled (old_lp), whatever the number of epochs
    metrics["sampler_logprob_gap"] = float(np.abs(old_lp - batch["sampler_logprobs"])[m].max())
    if engine is not None:
        with timer.phase("sync"):
            push_weights(engine, backend, state)
        metrics.update(sync_metrics(engine))
    metrics.update(timer.metrics())
    metrics["tokens_per_s"] = float(batch["attention_mask"].sum()) / max(sum(timer.seconds.values()), 1e-9)
    return state, metrics


def train_ppo(backend: Any, state: Any, tokenizer: Any, reward: Any, rows: Sequence[dict[str, Any]], cfg: PPOConfig,
              logger: MetricsLogger | None = None, ref_model: Any = None, start_step: int = 0,
              on_step: Callable[[int, Any, dict[str, float]], None] | None = None,
              guard: DivergenceGuard | None = None, engine: Any = None) -> Any:
    """Run PPO from ``start_step`` to ``cfg.steps``; ``state`` must carry a value head.

    ``engine``: a rollout engine (``diptych.rollout``) that samples instead of the backend; synced to ``state``
    first."""
    check_columns(reward, rows)
    guard = loop_guard(guard, cfg)
    batches = batch_iterator(rows, cfg.prompts_per_step, cfg.seed, start=start_step)
    if engine is not None and start_step < cfg.steps:
        push_weights(engine, backend, state)
    for step in range(start_step, cfg.steps):
        _, chunk = next(batches)
        state, metrics = ppo_step(backend, state, tokenizer, reward, chunk, cfg, step, ref_model, engine)
        if logger is not None:
            logger.log(step + 1, metrics)
        guard.check(step + 1, metrics, state)
        if on_step is not None:
            on_step(step + 1, state, metrics)
    return state
