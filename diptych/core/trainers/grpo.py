"""GRPO and its variants (Dr.GRPO, DAPO, GSPO, BNPO) as one backend-neutral loop.

One step (DeepSeekMath; DESIGN.md "Data flow of one GRPO step"):

1. ``prompts_per_step`` prompts, each sampled ``group_size`` times by ``backend.generate``;
2. completions decoded and scored by the reward (per component, for logging);
3. group advantages from ``diptych.core.advantages`` (``grpo`` z-score by default), with
   zero-variance groups optionally dropped (DAPO dynamic sampling);
4. reference log-probs only when ``beta > 0``;
5. ``num_iterations`` optimizer passes over the batch with the ``policy`` loss; old
   log-probs are recomputed by the trainer on the first pass's weights.

The loop owns no framework code: swapping ``backend`` swaps the panel, not the algorithm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diptych.core.advantages import compute_advantages, filter_zero_variance_groups
from diptych.core.losses import policy_preset
from diptych.core.metrics import MetricsLogger
from diptych.core.optim import OptimConfig
from diptych.core.sampling import SamplingConfig, parity_noise
from diptych.core.train_batch import split_microbatches
from diptych.core.trainers.base import (
    StepTimer,
    TrainerError,
    batch_iterator,
    columns_of,
    decode_completions,
    encode_prompts,
    rollout_batch,
    sequence_logprobs,
)
from diptych.recurrent.training import DepthPolicy


@dataclass
class GRPOConfig:
    """Defaults follow TRL where it is sensible for a small model (NOTES.md); see README."""

    steps: int = 50
    prompts_per_step: int = 16
    group_size: int = 8
    micro_batches: int = 1
    num_iterations: int = 1
    max_prompt_len: int = 32
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    loss: str = "grpo"
    """Policy-loss preset: grpo | dr_grpo | dapo | gspo | bnpo (diptych.core.losses.POLICY_PRESETS)."""
    loss_overrides: dict[str, Any] = field(default_factory=dict)
    beta: float = 0.0
    advantage: str = "grpo"
    filter_zero_variance: bool = False
    parity: bool = False
    """Draw sampling noise from one numpy stream so both backends sample identical tokens."""
    seed: int = 0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))
    depth: DepthPolicy | None = None
    """Recurrent-depth models only: the train depth schedule (truncated backprop) and the sampling depth."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise TrainerError(f"group_size must be >= 2 for group-relative advantages, got {self.group_size}.")
        rows = self.prompts_per_step * self.group_size
        if rows % self.micro_batches:
            raise TrainerError(
                f"prompts_per_step x group_size = {rows} rollouts do not split into micro_batches="
                f"{self.micro_batches}; choose micro_batches dividing {rows}."
            )
        if self.num_iterations < 1:
            raise TrainerError(f"num_iterations must be >= 1, got {self.num_iterations}.")

    def loss_config(self) -> Any:
        """The preset with this run's beta; dropped groups leave empty rows, which the loss must skip;
        Dr.GRPO's constant normaliser is the longest possible completion."""
        overrides: dict[str, Any] = {"beta": self.beta}
        if self.filter_zero_variance:
            overrides["allow_empty_sequences"] = True
        if self.loss == "dr_grpo":
            overrides["norm_length"] = self.max_new_tokens
        return policy_preset(self.loss, **{**overrides, **self.loss_overrides})

    def sampling(self, tokenizer: Any) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, min_p=self.min_p, n=self.group_size,
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


def grpo_step(backend: Any, state: Any, tokenizer: Any, reward: Any, rows: list[dict[str, Any]], cfg: GRPOConfig,
              step: int, ref_model: Any = None) -> tuple[Any, dict[str, float]]:
    """One GRPO step on ``rows`` (a batch of prompts): generate, score, advantages, update."""
    timer = StepTimer()
    g = cfg.group_size
    prompts = [r["prompt"] for r in rows]
    ids = encode_prompts(tokenizer, prompts, cfg.max_prompt_len)
    sampling = cfg.sampling(tokenizer)
    with timer.phase("generate"):
        noise = None
        if cfg.parity:
            noise = parity_noise(len(ids) * g, cfg.max_new_tokens, state_vocab(state), seed=cfg.seed * 100003 + step)
        rollout = backend.generate(state.model, ids, sampling, noise=noise,
                                   **({} if cfg.parity else {"seed": cfg.seed * 100003 + step}),
                                   **(cfg.depth.generate_kwargs() if cfg.depth is not None else {}))
    with timer.phase("score"):
        completions = decode_completions(tokenizer, rollout)
        rewards, components = score(reward, [p for p in prompts for _ in range(g)], completions,
                                    columns_of(rows, exclude=("prompt",), repeat=g))
        advantages = compute_advantages(cfg.advantage, rewards, g).astype(np.float32)
        batch = rollout_batch(rollout, cfg.max_prompt_len)
        dropped = 0
        if cfg.filter_zero_variance:
            keep, dropped = filter_zero_variance_groups(rewards, g)
            batch["mask"] = batch["mask"] * keep[:, None].astype(np.float32)
    metrics: dict[str, float] = {
        "reward": float(rewards.mean()), "reward_std": float(rewards.std()),
        "completion_length": float(rollout.lengths.mean()), "truncated_frac": float(rollout.truncated.mean()),
        "groups_dropped": float(dropped), **components,
    }
    if not batch["mask"].any():
        metrics.update(skipped=1.0, **timer.metrics())
        return state, metrics
    batch["advantages"] = advantages
    loss_cfg = cfg.loss_config()
    if cfg.depth is not None and cfg.depth.schedule is not None:  # old, ref and trained log-probs at depth r
        r, k = cfg.depth.train_depth(step)
        backend.set_depth(state.model, r, k)
        if ref_model is not None:
            backend.set_depth(ref_model, r)
    with timer.phase("train"):
        lp_old = sequence_logprobs(backend, state.model, batch["tokens"], batch["attention_mask"], batch["mask"],
                                   cfg.temperature)
        batch["old_logprobs"] = lp_old
        if cfg.beta > 0:
            if ref_model is None:
                raise TrainerError("beta > 0 needs a reference model; pass ref_model.")
            batch["ref_logprobs"] = sequence_logprobs(backend, ref_model, batch["tokens"], batch["attention_mask"],
                                                     batch["mask"], cfg.temperature)
        train_metrics: dict[str, float] = {}
        for _ in range(cfg.num_iterations):
            state, train_metrics = backend.train_step(state, split_microbatches(batch, cfg.micro_batches),
                                                      "policy", loss_cfg, temperature=cfg.temperature)
    mask = batch["mask"] > 0
    gap = np.abs(lp_old - batch["sampler_logprobs"])[mask]
    metrics["sampler_logprob_gap"] = float(gap.max()) if gap.size else 0.0
    metrics.update(train_metrics)
    metrics.update(timer.metrics())
    total_time = sum(timer.seconds.values())
    metrics["tokens_per_s"] = float(batch["attention_mask"].sum()) / max(total_time, 1e-9)
    return state, metrics


def state_vocab(state: Any) -> int:
    return int(state.model.spec.vocab_size)




def train_grpo(backend: Any, state: Any, tokenizer: Any, reward: Any, rows: Sequence[dict[str, Any]],
               cfg: GRPOConfig, logger: MetricsLogger | None = None, ref_model: Any = None,
               start_step: int = 0, on_step: Callable[[int, Any, dict[str, float]], None] | None = None) -> Any:
    """Run GRPO from ``start_step`` to ``cfg.steps``; ``on_step`` may checkpoint or evaluate."""
    check_columns(reward, rows)
    batches = batch_iterator(rows, cfg.prompts_per_step, cfg.seed, start=start_step)
    for step in range(start_step, cfg.steps):
        _, chunk = next(batches)
        state, metrics = grpo_step(backend, state, tokenizer, reward, chunk, cfg, step, ref_model)
        if logger is not None:
            logger.log(step + 1, metrics)
        if on_step is not None:
            on_step(step + 1, state, metrics)
    return state


