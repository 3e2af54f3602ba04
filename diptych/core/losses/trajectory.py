"""Latent-trajectory credit (RLTT) for GRPO on recurrent-depth models: reward every iteration, not only the last.

Plain GRPO on a looped model scores the sampled tokens with the final latent state only. RLTT (Williams and
Tureci, arXiv 2602.10520; public code ``jonwill8/RLTT``, ``aggregate_multi_loop_log_probs``) decodes each
iteration's state through the coda and head and trains on the weighted log-prob

    log P_traj(y_t) = sum_i w_i log P^(i)(y_t)        (w_i >= 0, sum_i w_i = 1)

in place of the final one. Here the iterations are the ``k`` differentiated ones of truncated backprop (the
model's output ``iteration_logprobs`` is ``[B, k, T - 1]``, iteration ``r - k + 1 .. r``); with ``k = r`` (no
truncation) this is RLTT's sum over every loop. Weightings:

* ``final``       ``w = (0, ..., 0, 1)``: today's GRPO (computed on the plain ``logprobs`` output, so the loss and
  gradient are exactly the ``policy`` loss's);
* ``uniform``     ``w_i = 1 / k`` (RLTT option A);
* ``increasing``  ``w_i = i^alpha / sum_j j^alpha`` over ``i = 1..k`` (RLTT option B, "progressive").

The weighted log-prob then goes through the ``policy`` loss (clipping, KL to a reference, aggregation) as the
policy's log-prob. Without ``old_logprobs`` (one optimizer pass per batch) the old policy is the detached
weighted log-prob itself, ratio 1, and the gradient is RLTT's on-policy ``-A sum_i w_i grad log P^(i)``.

``successive_kl > 0`` adds ``successive_kl * mean_i KL_est(P^(i+1) || P^(i))`` per token: a sampled-token
estimate (the policy's ``kl_estimator``, k3 by default) of how far consecutive iterations' distributions are
apart, on the sampled tokens (which come from the final iteration's distribution, so it is an estimate, not the
full-vocabulary KL that would need ``k`` ``[T, V]`` arrays).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from diptych.core import xp as X
from diptych.core.config import ConfigError
from diptych.core.losses import registry as _registry
from diptych.core.losses.common import LossInputError, aggregate, require, token_mask, token_metric
from diptych.core.losses.policy import PolicyLossConfig, kl_estimate, policy_loss
from diptych.core.losses.registry import BatchLayout, register_loss

Array = Any
Weighting = Literal["final", "uniform", "increasing"]
WEIGHTINGS: tuple[str, ...] = ("final", "uniform", "increasing")

ITERATION_LOGPROBS = "iteration_logprobs"
"""The model output this loss needs: ``[B, k, T - 1]`` target log-probs of each differentiated iteration."""


@dataclasses.dataclass(frozen=True)
class TrajectoryLossConfig:
    """``policy``: the clipped surrogate the weighted log-prob goes through; ``weighting`` over the k
    differentiated iterations (see the module docstring); ``alpha`` the exponent of ``increasing``;
    ``successive_kl`` the weight of the KL between successive iterations (0: off)."""

    policy: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    weighting: Weighting = "final"
    alpha: float = 1.0
    successive_kl: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.policy, PolicyLossConfig):
            raise ConfigError(f"TrajectoryLossConfig.policy must be a PolicyLossConfig, got "
                              f"{type(self.policy).__name__}.")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}.")
        if not np.isfinite(self.alpha) or self.alpha < 0:
            raise ConfigError(f"alpha must be a finite number >= 0 (1: linear in the iteration), got {self.alpha}.")
        if not np.isfinite(self.successive_kl) or self.successive_kl < 0:
            raise ConfigError(f"successive_kl must be a finite number >= 0 (0: off), got {self.successive_kl}.")
        if self.policy.entropy_coef:
            raise ConfigError("TrajectoryLossConfig does not take an entropy bonus (entropy_coef > 0): the entropy "
                              "of which iteration is undefined; set policy.entropy_coef=0.")

    @property
    def per_iteration(self) -> bool:
        """Whether the loss reads every iteration (anything but plain final-iteration GRPO)."""
        return self.weighting != "final" or self.successive_kl > 0


@dataclasses.dataclass(frozen=True)
class TrajectoryCredit:
    """The trainer-side knob (``GRPOConfig.trajectory``): how GRPO credits a recurrent model's latent trajectory.
    ``weighting="final"`` with ``successive_kl=0`` is plain GRPO."""

    weighting: Weighting = "final"
    alpha: float = 1.0
    successive_kl: float = 0.0

    def __post_init__(self) -> None:
        self.loss_config(PolicyLossConfig())  # one set of checks, the loss config's

    def loss_config(self, policy: PolicyLossConfig) -> TrajectoryLossConfig:
        """The ``trajectory`` loss config over this run's policy loss."""
        return TrajectoryLossConfig(policy=policy, weighting=self.weighting, alpha=self.alpha,
                                    successive_kl=self.successive_kl)


def iteration_weights(k: int, weighting: str, alpha: float = 1.0) -> np.ndarray:
    """``[k]`` float32 weights over the differentiated iterations (oldest first), summing to 1."""
    if k < 1:
        raise LossInputError(f"iteration_logprobs has {k} iterations; it needs at least one.")
    if weighting == "final":
        w = np.zeros(k)
        w[-1] = 1.0
    elif weighting == "uniform":
        w = np.ones(k)
    elif weighting == "increasing":
        w = np.arange(1, k + 1, dtype=np.float64) ** alpha
    else:
        raise ConfigError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}.")
    return (w / w.sum()).astype(np.float32)


def _needs(cfg: TrajectoryLossConfig) -> tuple[str, ...]:
    if cfg is not None and cfg.per_iteration:
        return (ITERATION_LOGPROBS, _registry.DETACHED + ITERATION_LOGPROBS)
    return ("logprobs", _registry.DETACHED + "logprobs")


TRAJECTORY_LAYOUT = BatchLayout(
    required=_registry.POLICY_LAYOUT.required,
    optional=_registry.POLICY_LAYOUT.optional,
    per_token=_registry.POLICY_LAYOUT.per_token,
    per_row_or_token=_registry.POLICY_LAYOUT.per_row_or_token,
    int_keys=_registry.POLICY_LAYOUT.int_keys,
)
"""The policy layout without its detached default: an omitted ``old_logprobs`` is the detached log-prob the loss
trains on (the final one under ``final``, the weighted one otherwise), which only the loss can tell apart."""


@register_loss("trajectory", config=TrajectoryLossConfig, layout=TRAJECTORY_LAYOUT, needs=_needs)
def trajectory_loss(batch: Mapping[str, Array], cfg: TrajectoryLossConfig) -> tuple[Array, Array, dict[str, Array]]:
    """The policy loss on ``sum_i w_i iteration_logprobs[:, i]`` (+ the successive-iteration KL); see the module.

    Metrics: the policy loss's, plus ``iter_logprob_<i>`` (mean log-prob of iteration i of k, 1 = oldest) and,
    when on, ``successive_kl``.
    """
    if not cfg.per_iteration:
        if batch.get("old_logprobs") is None:
            batch = {**batch, "old_logprobs": require(batch, _registry.DETACHED + "logprobs")}
        return policy_loss(batch, cfg.policy)
    lps = X.upcast(require(batch, ITERATION_LOGPROBS, "for a per-iteration weighting"))
    if lps.ndim != 3:
        raise LossInputError(f"batch[{ITERATION_LOGPROBS!r}] must be [batch, iterations, time], got shape "
                             f"{tuple(lps.shape)}.")
    xp = X.namespace(lps)
    k = lps.shape[1]
    detached = X.as_like(require(batch, _registry.DETACHED + ITERATION_LOGPROBS), lps)
    w = X.as_like(iteration_weights(k, cfg.weighting, cfg.alpha), lps)
    agg = xp.sum(lps * w[None, :, None], axis=1)
    if batch.get("old_logprobs") is not None and cfg.weighting != "final":
        raise LossInputError(
            f"The trajectory loss with weighting {cfg.weighting!r} is on-policy (RLTT): old_logprobs would be the "
            "final iteration's, not the weighted ones; use one optimizer pass per batch (num_iterations=1).")
    inner = {key: v for key, v in batch.items() if key not in (ITERATION_LOGPROBS, _registry.DETACHED
                                                                + ITERATION_LOGPROBS)}
    inner["logprobs"] = agg
    if inner.get("old_logprobs") is None:
        inner["old_logprobs"] = xp.sum(detached * w[None, :, None], axis=1)
    total, denom, metrics = policy_loss(inner, cfg.policy)
    mask = token_mask(batch, "mask", agg, "logprobs", cfg.policy.allow_empty_sequences)
    for i in range(k):
        token_metric(metrics, f"iter_logprob_{i + 1}", xp.where(mask > 0, detached[:, i], xp.zeros_like(agg)), mask)
    if cfg.successive_kl > 0 and k > 1:
        kl = xp.mean(kl_estimate(lps[:, 1:], lps[:, :-1], cfg.policy.kl_estimator), axis=1)
        kl = xp.where(mask > 0, kl, xp.zeros_like(kl))
        kl_total, _ = aggregate(kl, mask, cfg.policy.aggregation, cfg.policy.norm_length)
        total = total + cfg.successive_kl * kl_total
        token_metric(metrics, "successive_kl", kl, mask)
    return total, denom, metrics
