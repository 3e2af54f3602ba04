"""Off-policy correction for asynchronous RL: the policy loss on tokens a stale policy sampled.

In asynchronous GRPO (``diptych.asyncrl``) a token was drawn by the *behaviour* policy ``mu`` (the weight
version the generator had when it sampled it; its log-prob ``sampler_logprobs`` is recorded per token), while
the trainer updates ``pi_theta`` from the *proximal* policy ``pi_prox`` (the version the trainer last had:
``old_logprobs``, or the detached current log-probs on a step's first pass). With ``w = pi_prox / mu`` per token:

    none        L = L_clip(pi_theta / pi_prox)                      Magistral: no correction (= synchronous GRPO)
    tis         L = min(w, cap) * L_clip(pi_theta / pi_prox)        truncated IS, Yao et al. 2025 (cap about 2)
    decoupled   L = w * [w <= cap] * L_clip(pi_theta / pi_prox)     AReaL's decoupled PPO (Fu et al. 2025): the
                                                                    trust region is around pi_prox, not mu; tokens
                                                                    whose weight exceeds ``cap`` are left out

``L_clip`` is the policy loss of ``diptych.core.losses.policy`` (clip, dual clip, KL, entropy, aggregation),
run unchanged: the weight multiplies the advantage (``w > 0``, so ``max(-A w r, -A w clip(r)) = w L_clip``)
and is a constant (both log-probs are detached), so the same lines differentiate on JAX and torch, and a
left-out token keeps its place in the denominator (the aggregation does not depend on the correction).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from diptych.core import xp as X
from diptych.core.config import ConfigError
from diptych.core.losses.common import LossInputError, check_shape, masked_input, require, token_mask, token_metric
from diptych.core.losses.policy import PolicyLossConfig, _policy_needs, policy_loss
from diptych.core.losses.registry import POLICY_LAYOUT, register_loss

Array = Any
Correction = Literal["none", "tis", "decoupled"]
CORRECTIONS: tuple[str, ...] = ("none", "tis", "decoupled")


@dataclasses.dataclass(frozen=True)
class OffPolicyLossConfig:
    """The policy loss (``policy``) plus how to correct for the behaviour policy (see the module docstring)."""

    policy: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    correction: Correction = "none"
    cap: float | None = 2.0
    """``tis``: the truncation of ``w``; ``decoupled``: tokens with ``w > cap`` are left out (None: keep all)."""

    def __post_init__(self) -> None:
        if self.correction not in CORRECTIONS:
            raise ConfigError(f"correction must be one of {', '.join(CORRECTIONS)}, got {self.correction!r}.")
        if self.cap is not None and not self.cap > 0:
            raise ConfigError(f"cap must be > 0 (about 2) or None, got {self.cap}.")
        if self.correction == "tis" and self.cap is None:
            raise ConfigError("correction 'tis' truncates the importance weight at cap: set cap (about 2).")
        if self.correction != "none" and self.policy.tis_cap is not None:
            raise ConfigError(f"policy.tis_cap and correction {self.correction!r} would weight twice; drop tis_cap "
                              "(the correction's cap replaces it).")

    @property
    def entropy_coef(self) -> float:
        """Read by the needs declaration (entropy is computed only when it carries a coefficient)."""
        return self.policy.entropy_coef

    @property
    def allow_empty_sequences(self) -> bool:
        return self.policy.allow_empty_sequences


def behaviour_weights(proximal: Array, behaviour: Array, correction: str, cap: float | None) -> tuple[Array, Array]:
    """Per-token ``(weight, clipped)``: the correction's multiplier of the advantage and where the cap acted."""
    xp = X.namespace(proximal)
    raw = xp.exp(proximal - behaviour)
    if correction == "tis":
        return xp.minimum(raw, xp.full_like(raw, cap)), raw > cap
    if correction == "decoupled":
        if cap is None:
            return raw, raw > xp.full_like(raw, float("inf"))
        over = raw > cap
        return xp.where(over, xp.zeros_like(raw), raw), over
    raise LossInputError(f"Unknown correction {correction!r}; choose one of {', '.join(CORRECTIONS)}.")


def _needs(cfg: OffPolicyLossConfig) -> tuple[str, ...]:
    return _policy_needs(cfg.policy)


@register_loss("offpolicy", config=OffPolicyLossConfig, layout=POLICY_LAYOUT, needs=_needs)
def offpolicy_loss(batch: Mapping[str, Array], cfg: OffPolicyLossConfig) -> tuple[Array, Array, dict[str, Array]]:
    """The policy loss with the behaviour correction; metrics add ``offpolicy_weight`` and ``offpolicy_clipfrac``
    (the fraction of tokens whose weight the cap truncated or left out), and ``behaviour_kl`` (k3 of the
    behaviour policy against the proximal one: how far the samples are off-policy)."""
    if cfg.correction == "none":
        return policy_loss(batch, cfg.policy)
    lp = X.upcast(require(batch, "logprobs"))
    if lp.ndim != 2:
        raise LossInputError(f"batch['logprobs'] must be [batch, time], got shape {tuple(lp.shape)}.")
    xp = X.namespace(lp)
    B, T = lp.shape
    mask = token_mask(batch, "mask", lp, "logprobs", cfg.policy.allow_empty_sequences)
    why = f"with correction {cfg.correction!r} (the behaviour policy's per-token log-probs)"
    prox = X.as_like(require(batch, "old_logprobs"), lp)
    mu = X.as_like(require(batch, "sampler_logprobs", why), lp)
    check_shape("old_logprobs", prox, (B, T), "logprobs")
    check_shape("sampler_logprobs", mu, (B, T), "logprobs")
    prox, mu = masked_input(prox, mask, "old_logprobs"), masked_input(mu, mask, "sampler_logprobs")
    w, clipped = behaviour_weights(prox, mu, cfg.correction, cfg.cap)
    adv = X.as_like(require(batch, "advantages"), lp)
    if tuple(adv.shape) == (B,):
        adv = xp.broadcast_to(adv[:, None], (B, T))
    elif tuple(adv.shape) != (B, T):
        raise LossInputError(f"batch['advantages'] must be [{B}] or [{B}, {T}], got shape {tuple(adv.shape)}.")
    inner = {**batch, "advantages": masked_input(adv, mask, "advantages") * w}
    total, denom, metrics = policy_loss(inner, cfg.policy)
    token_metric(metrics, "offpolicy_weight", w, mask)
    token_metric(metrics, "offpolicy_clipfrac", xp.astype(clipped, lp.dtype), mask)
    token_metric(metrics, "behaviour_kl", xp.expm1(mu - prox) - (mu - prox), mask)
    return total, denom, metrics
