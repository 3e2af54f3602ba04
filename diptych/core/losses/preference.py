"""Preference losses over (chosen, rejected) pairs: the DPO family, SimPO and ORPO.

Inputs are per-token log-probs ``[B, T]`` of the policy (with gradient) and, for the
reference-based kinds, of a frozen reference; a sequence log-prob is the masked sum
``pi = sum_t m_t logp_t`` and ``|y| = sum_t m_t`` its length. With
``h = beta * ((pi_c - ref_c) - (pi_r - ref_r))``, ``u`` the same difference with every log-prob
divided by its length, and label smoothing ``e``:

* ``sigmoid``  DPO (Rafailov et al. 2023): ``-(1-e) log s(h) - e log s(-h)`` (``e > 0`` is cDPO).
* ``robust``   robust DPO (Chowdhury et al. 2024): ``(-(1-e) log s(h) + e log s(-h)) / (1 - 2e)``.
* ``hinge``    SLiC-HF (Zhao et al. 2023): ``max(0, 1 - h)``.
* ``ipo``      IPO (Azar et al. 2023): ``(u - 1 / (2 beta))^2``, length-normalised as in TRL.
* ``sigmoid_norm`` length-normalised DPO (Tulu 3, Lambert et al. 2024): the sigmoid loss of ``beta u``.
* ``simpo``    SimPO (Meng et al. 2024), reference-free: sigmoid loss of ``beta (pi_c/|y_c| - pi_r/|y_r|) - gamma``.
* ``apo_zero`` / ``apo_down`` APO (D'Oosterlinck et al. 2024), with ``r = beta (pi - ref)``:
  ``1 - s(r_c) + s(r_r)`` and ``s(r_c) + 1 - s(r_c - r_r)``.
* ``orpo``     ORPO (Hong et al. 2024), reference-free, with mean log-probs ``a = pi / |y|``:
  ``-a_c + lambda * -log s(log(e^a_c / (1 - e^a_c)) - log(e^a_r / (1 - e^a_r)))``.

Each pair is one unit: ``(sum over pairs, number of pairs)``. Metrics (sums with ``_count`` pairs):
``rewards_chosen``, ``rewards_rejected``, ``rewards_margin``, ``rewards_accuracy`` (implicit rewards:
``beta (pi - ref)``, length-normalised for ipo / sigmoid_norm, ``beta a`` for simpo, ``lambda a`` for
orpo), ``logps_chosen``, ``logps_rejected``. ORPO adds TRL's ORPO metrics under TRL's names:
``nll_loss`` (``-a_c``), ``log_odds_chosen`` (the log odds ratio
``log(e^a_c / (1 - e^a_c)) - log(e^a_r / (1 - e^a_r))``, despite its name) and ``log_odds_ratio``
(its ``log sigmoid``, the term ``lambda`` weighs). Before issue 12 these were ``nll`` and
``log_odds_ratio`` (the log odds ratio) and ORPO's rewards were scaled by ``beta``, which the ORPO
loss does not use; they now follow TRL, whose ORPO ``beta`` is this ``orpo_lambda``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from diptych.core import xp as X
from diptych.core.config import ConfigError
from diptych.core.losses.common import LossInputError, check_shape, masked_input, require, row_metric, token_mask
from diptych.core.losses.registry import PREFERENCE_LAYOUT, register_loss

Array = Any
PreferenceKind = Literal[
    "sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "simpo", "apo_zero", "apo_down", "orpo"
]
PREFERENCE_KINDS: tuple[str, ...] = (
    "sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "simpo", "apo_zero", "apo_down", "orpo"
)
REFERENCE_FREE = ("simpo", "orpo")
LENGTH_NORMALISED = ("ipo", "sigmoid_norm", "simpo", "orpo")


@dataclasses.dataclass(frozen=True)
class PreferenceLossConfig:
    """``beta`` 0.1 (DPO); SimPO uses beta about 2 and ``gamma`` about 0.5 to 1.6; ORPO ``orpo_lambda`` 0.1."""

    kind: PreferenceKind = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5
    orpo_lambda: float = 0.1
    allow_empty_sequences: bool = False

    def __post_init__(self) -> None:
        if self.kind not in PREFERENCE_KINDS:
            raise ConfigError(f"kind must be one of {', '.join(PREFERENCE_KINDS)}, got {self.kind!r}.")
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}.")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        if self.label_smoothing > 0 and self.kind not in ("sigmoid", "robust", "sigmoid_norm", "simpo"):
            raise ConfigError(f"label_smoothing has no effect on kind {self.kind!r}; set it to 0.")
        if self.orpo_lambda < 0:
            raise ConfigError(f"orpo_lambda must be >= 0, got {self.orpo_lambda}.")


def _side(batch: Mapping[str, Array], side: str, allow_empty: bool, with_ref: bool):
    """(policy sum, reference sum or None, length) of one side of the pair."""
    lp = X.upcast(require(batch, f"{side}_logprobs"))
    if lp.ndim != 2:
        raise LossInputError(f"batch['{side}_logprobs'] must be [batch, time], got shape {tuple(lp.shape)}.")
    xp = X.namespace(lp)
    mask = token_mask(batch, f"{side}_mask", lp, f"{side}_logprobs", allow_empty)
    pi = xp.sum(masked_input(lp, mask, f"{side}_logprobs"), axis=-1)
    ref = None
    if with_ref:
        key = f"ref_{side}_logprobs"
        r = X.as_like(require(batch, key, "for reference-based preference losses"), lp)
        check_shape(key, r, tuple(lp.shape), f"{side}_logprobs")
        ref = xp.sum(masked_input(r, mask, key), axis=-1)
    return pi, ref, xp.sum(mask, axis=-1)


def _sigmoid_loss(h: Array, e: float) -> Array:
    return -(1.0 - e) * X.log_sigmoid(h) - e * X.log_sigmoid(-h)


@register_loss("preference", config=PreferenceLossConfig, layout=PREFERENCE_LAYOUT,
               needs=("chosen_logprobs", "rejected_logprobs"))
def preference_loss(batch: Mapping[str, Array], cfg: PreferenceLossConfig) -> tuple[Array, Array, dict[str, Array]]:
    """One of the preference losses in the module docstring, summed over pairs."""
    with_ref = cfg.kind not in REFERENCE_FREE
    pi_c, ref_c, n_c = _side(batch, "chosen", cfg.allow_empty_sequences, with_ref)
    pi_r, ref_r, n_r = _side(batch, "rejected", cfg.allow_empty_sequences, with_ref)
    if pi_c.shape[0] != pi_r.shape[0]:
        raise LossInputError(
            f"chosen and rejected batches differ in size ({pi_c.shape[0]} vs {pi_r.shape[0]}): pass one rejected "
            "completion per chosen one."
        )
    xp = X.namespace(pi_c)
    weight = xp.astype((n_c > 0) & (n_r > 0), pi_c.dtype)
    beta, e = cfg.beta, cfg.label_smoothing
    if cfg.kind in LENGTH_NORMALISED:
        pi_c, pi_r = X.safe_divide(pi_c, n_c), X.safe_divide(pi_r, n_r)
        if with_ref:
            ref_c, ref_r = X.safe_divide(ref_c, n_c), X.safe_divide(ref_r, n_r)
    # ORPO's implicit reward is scaled by its own weight orpo_lambda (TRL's ORPO calls it beta); beta plays no
    # part in the ORPO loss, so scaling its rewards by beta would report a margin the loss never saw.
    scale = cfg.orpo_lambda if cfg.kind == "orpo" else beta
    if with_ref:
        reward_c, reward_r = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    else:
        reward_c, reward_r = scale * pi_c, scale * pi_r
    h = reward_c - reward_r
    metrics: dict[str, Array] = {}
    kind = cfg.kind
    if kind in ("sigmoid", "sigmoid_norm"):
        loss = _sigmoid_loss(h, e)
    elif kind == "robust":
        loss = (-(1.0 - e) * X.log_sigmoid(h) + e * X.log_sigmoid(-h)) / (1.0 - 2.0 * e)
    elif kind == "hinge":
        loss = xp.maximum(1.0 - h, xp.zeros_like(h))
    elif kind == "ipo":
        loss = (h / beta - 1.0 / (2.0 * beta)) ** 2
    elif kind == "simpo":
        loss = _sigmoid_loss(h - cfg.gamma, e)
    elif kind == "apo_zero":
        loss = 1.0 - X.sigmoid(reward_c) + X.sigmoid(reward_r)
    elif kind == "apo_down":
        loss = X.sigmoid(reward_c) + 1.0 - X.sigmoid(reward_c - reward_r)
    elif kind == "orpo":
        # Mean log-probs are < 0 for real data; the cap keeps log(1 - e^a) finite at the degenerate a = 0.
        cap = xp.full_like(pi_c, -1e-6)
        a_c, a_r = xp.minimum(pi_c, cap), xp.minimum(pi_r, cap)
        log_odds = (a_c - a_r) - (xp.log(-xp.expm1(a_c)) - xp.log(-xp.expm1(a_r)))
        nll = -pi_c
        log_sig = X.log_sigmoid(log_odds)
        loss = nll - cfg.orpo_lambda * log_sig
        # TRL's names: log_odds_chosen is the log odds ratio itself, log_odds_ratio its log-sigmoid.
        row_metric(metrics, "nll_loss", nll, weight)
        row_metric(metrics, "log_odds_chosen", log_odds, weight)
        row_metric(metrics, "log_odds_ratio", log_sig, weight)
    else:  # unreachable: the config validated kind
        raise LossInputError(f"Unknown preference kind {kind!r}.")
    row_metric(metrics, "rewards_chosen", reward_c, weight)
    row_metric(metrics, "rewards_rejected", reward_r, weight)
    row_metric(metrics, "rewards_margin", h, weight)
    row_metric(metrics, "rewards_accuracy", xp.astype(h > 0, h.dtype), weight)
    row_metric(metrics, "logps_chosen", pi_c, weight)
    row_metric(metrics, "logps_rejected", pi_r, weight)
    return xp.sum(loss * weight), xp.sum(weight), metrics
