"""Policy-gradient loss: clipped surrogate (PPO / GRPO family), KL to a reference, entropy bonus.

Per token, with ``r = exp(logp - logp_old)`` and advantage ``A``:

    L_pg = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))          PPO, Schulman et al. 2017
    L_pg = min(L_pg, -c A)        when A < 0 and dual_clip = c > 1    dual clip, Ye et al. 2020
    L_pg = L_pg * min(exp(logp_old - logp_sampler), C)                truncated IS, Yao et al. 2025
    L    = L_pg + beta KL_k(logp, logp_ref) - entropy_coef H          GRPO, Shao et al. 2024

``eps_low != eps_high`` is DAPO's clip-higher (Yu et al. 2025). With ``ratio_level="sequence"``
the ratio is GSPO's (Zheng et al. 2025): ``s_b = exp(mean_t(logp - logp_old))`` over the sequence's
tokens, shared by all its tokens. KL estimators (Schulman 2020, "Approximating KL divergence"),
with ``d = logp_ref - logp``: ``k1 = -d``, ``k2 = d^2 / 2``, ``k3 = exp(d) - d - 1``. ``k1`` has
zero expected gradient on-policy, so a KL *loss* wants ``k3`` (or ``k2``); ``k1`` is right for the
KL-in-reward shaping PPO uses (``diptych.core.advantages.kl_shaped_rewards``).

Constants (old, reference and sampler log-probs, advantages) arrive as inputs: no stop-gradient is
needed, so the same lines differentiate on JAX and torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from diptych.core import xp as X
from diptych.core.config import ConfigError
from diptych.core.losses.common import (
    AGGREGATIONS,
    Aggregation,
    LossInputError,
    aggregate,
    check_shape,
    masked_input,
    require,
    token_mask,
    token_metric,
)
from diptych.core.losses.registry import POLICY_LAYOUT, register_loss

Array = Any
KLEstimator = Literal["k1", "k2", "k3"]


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """Knobs of the clipped policy-gradient loss; see the module docstring for the formula."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    ratio_level: Literal["token", "sequence"] = "token"
    kl_estimator: KLEstimator = "k3"
    beta: float = 0.0
    entropy_coef: float = 0.0
    tis_cap: float | None = None
    aggregation: Aggregation = "token_mean"
    norm_length: int | None = None
    allow_empty_sequences: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.eps_low < 1:
            raise ConfigError(f"eps_low must be in [0, 1), got {self.eps_low}.")
        if self.eps_high < 0:
            raise ConfigError(f"eps_high must be >= 0, got {self.eps_high}.")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError(f"dual_clip must be > 1 (e.g. 3.0) or None, got {self.dual_clip}.")
        if self.ratio_level not in ("token", "sequence"):
            raise ConfigError(f"ratio_level must be 'token' or 'sequence', got {self.ratio_level!r}.")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"kl_estimator must be 'k1', 'k2' or 'k3', got {self.kl_estimator!r}.")
        if self.beta < 0 or self.entropy_coef < 0:
            raise ConfigError(f"beta and entropy_coef must be >= 0, got {self.beta} and {self.entropy_coef}.")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ConfigError(f"tis_cap must be > 0 (about 2) or None, got {self.tis_cap}.")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}.")
        if self.aggregation == "seq_mean_token_sum_norm" and (self.norm_length is None or self.norm_length <= 0):
            raise ConfigError(
                "aggregation 'seq_mean_token_sum_norm' needs norm_length > 0: set it to the maximum completion "
                "length (it must stay constant through training)."
            )


POLICY_PRESETS: dict[str, PolicyLossConfig] = {
    # DeepSeekMath (Shao et al. 2024): symmetric clip, k3 KL in the loss with beta 0.04, per-sequence token mean.
    "grpo": PolicyLossConfig(beta=0.04, kl_estimator="k3", aggregation="seq_mean_token_mean"),
    # Dr.GRPO (Liu et al. 2025): no KL, token sums over a constant; set norm_length to the max completion length.
    "dr_grpo": PolicyLossConfig(beta=0.0, aggregation="seq_mean_token_sum_norm", norm_length=1024),
    # DAPO (Yu et al. 2025): clip-higher, no KL, token mean over the whole (accumulated) batch.
    "dapo": PolicyLossConfig(eps_low=0.2, eps_high=0.28, beta=0.0, aggregation="token_mean"),
    # GSPO (Zheng et al. 2025): sequence-level ratio with a tiny trust region, no KL, mean over sequences.
    "gspo": PolicyLossConfig(
        eps_low=3e-4, eps_high=4e-4, ratio_level="sequence", beta=0.0, aggregation="seq_mean_token_mean"
    ),
    # TRL's "bnpo": sum over active tokens of the batch. diptych divides once after accumulation, so this is
    # token_mean over the accumulated batch; it differs from dapo by keeping the symmetric clip.
    "bnpo": PolicyLossConfig(eps_low=0.2, eps_high=0.2, beta=0.0, aggregation="token_mean"),
}


def policy_preset(name: str, **overrides: Any) -> PolicyLossConfig:
    """A named preset with fields replaced, e.g. ``policy_preset("dr_grpo", norm_length=512)``."""
    if name not in POLICY_PRESETS:
        raise ConfigError(f"Unknown policy preset {name!r}; choose one of {', '.join(sorted(POLICY_PRESETS))}.")
    return dataclasses.replace(POLICY_PRESETS[name], **overrides)


def kl_estimate(logprobs: Array, ref_logprobs: Array, estimator: str = "k3") -> Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020): k1, k2 or k3."""
    xp = X.namespace(logprobs)
    d = ref_logprobs - logprobs
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return xp.expm1(d) - d
    raise LossInputError(f"Unknown KL estimator {estimator!r}; choose k1, k2 or k3.")


def _policy_needs(cfg: PolicyLossConfig) -> tuple[str, ...]:
    """Entropy costs a full-vocabulary pass, so it is computed only when it carries a coefficient."""
    return ("logprobs", "entropy") if float(getattr(cfg, "entropy_coef", 0.0) or 0.0) != 0.0 else ("logprobs",)


@register_loss("policy", config=PolicyLossConfig, layout=POLICY_LAYOUT, needs=_policy_needs)
def policy_loss(batch: Mapping[str, Array], cfg: PolicyLossConfig) -> tuple[Array, Array, dict[str, Array]]:
    """Clipped surrogate + KL + entropy over ``[B, T]`` per-token log-probs; returns (sum, denominator, metrics).

    Metrics (sums, each with ``<name>_count``): ``pg_loss``, ``ratio``, ``clipfrac``, ``clipfrac_low``,
    ``clipfrac_high``, ``approx_kl`` (k3 of the old policy against the current one), and when used
    ``dual_clipfrac``, ``kl``, ``entropy``, ``tis_weight``, ``tis_clipfrac``.
    """
    lp = X.upcast(require(batch, "logprobs"))
    if lp.ndim != 2:
        raise LossInputError(f"batch['logprobs'] must be [batch, time], got shape {tuple(lp.shape)}.")
    xp = X.namespace(lp)
    B, T = lp.shape
    mask = token_mask(batch, "mask", lp, "logprobs", cfg.allow_empty_sequences)

    def token_input(key: str, why: str = "") -> Array:
        x = X.as_like(require(batch, key, why), lp)
        check_shape(key, x, (B, T), "logprobs")
        return masked_input(x, mask, key)

    lp = masked_input(lp, mask, "logprobs")
    old = token_input("old_logprobs")
    adv = X.as_like(require(batch, "advantages"), lp)
    if tuple(adv.shape) == (B,):
        adv = xp.broadcast_to(adv[:, None], (B, T))
    elif tuple(adv.shape) != (B, T):
        raise LossInputError(f"batch['advantages'] must be [{B}] or [{B}, {T}], got shape {tuple(adv.shape)}.")
    adv = masked_input(adv, mask, "advantages")

    log_ratio = lp - old
    if cfg.ratio_level == "sequence":
        seq_log_ratio = X.masked_mean(log_ratio, mask, axis=-1)
        log_ratio = xp.broadcast_to(seq_log_ratio[:, None], (B, T))
    ratio = xp.exp(log_ratio)
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * xp.clip(ratio, lo, hi)
    # An explicit where (not maximum) so ties route the gradient through the unclipped branch on every backend.
    clip_active = pg_clipped > pg_unclipped
    pg = xp.where(clip_active, pg_clipped, pg_unclipped)
    f = lp.dtype
    metrics: dict[str, Array] = {}
    if cfg.dual_clip is not None:
        pg_dual = -adv * cfg.dual_clip
        dual_active = (adv < 0) & (pg > pg_dual)
        pg = xp.where(dual_active, pg_dual, pg)
        token_metric(metrics, "dual_clipfrac", xp.astype(dual_active, f), mask)

    if cfg.tis_cap is not None:
        sampler = token_input("sampler_logprobs", "when tis_cap is set (truncated importance sampling)")
        raw_w = xp.exp(old - sampler)
        tis_w = xp.minimum(raw_w, xp.full_like(raw_w, cfg.tis_cap))
        pg = pg * tis_w
        token_metric(metrics, "tis_weight", tis_w, mask)
        token_metric(metrics, "tis_clipfrac", xp.astype(raw_w > cfg.tis_cap, f), mask)

    per_token = pg
    token_metric(metrics, "pg_loss", pg, mask)
    if cfg.beta > 0:
        ref = token_input("ref_logprobs", "when beta > 0 (KL to the reference)")
        kl = kl_estimate(lp, ref, cfg.kl_estimator)
        per_token = per_token + cfg.beta * kl
        token_metric(metrics, "kl", kl, mask)
    elif batch.get("ref_logprobs") is not None:
        token_metric(metrics, "kl", kl_estimate(lp, token_input("ref_logprobs"), cfg.kl_estimator), mask)
    if cfg.entropy_coef > 0:
        ent = token_input("entropy", "when entropy_coef > 0 (entropy bonus)")
        per_token = per_token - cfg.entropy_coef * ent
        token_metric(metrics, "entropy", ent, mask)
    elif batch.get("entropy") is not None:
        token_metric(metrics, "entropy", token_input("entropy"), mask)

    total, denom = aggregate(per_token, mask, cfg.aggregation, cfg.norm_length)
    token_metric(metrics, "ratio", ratio, mask)
    token_metric(metrics, "clipfrac", xp.astype(clip_active, f), mask)
    token_metric(metrics, "clipfrac_low", xp.astype(clip_active & (ratio < lo), f), mask)
    token_metric(metrics, "clipfrac_high", xp.astype(clip_active & (ratio > hi), f), mask)
    token_metric(metrics, "approx_kl", xp.expm1(old - lp) - (old - lp), mask)
    return total, denom, metrics
