"""Every loss written once over the Array API, so JAX and torch run the same lines.

A loss is a pure function ``loss(batch, cfg) -> (unreduced_sum, denominator, metrics)`` where
``batch`` maps names to arrays of one library (numpy inputs are moved next to the log-probs).
The trainer sums ``unreduced_sum`` and ``denominator`` over micro-batches and devices and calls
``reduce_loss`` once (DESIGN.md rule 3). Metrics are sums with ``<name>_count`` companions:
accumulate with ``sum_metrics`` and turn into means with ``finalize_metrics``.

Registry (``LOSSES`` / ``get_loss(name)``; config class in ``LOSS_CONFIGS``):

* ``policy``      ``logprobs, old_logprobs, advantages, mask`` [+ ``ref_logprobs``, ``sampler_logprobs``,
  ``entropy``]; ``PolicyLossConfig`` (named presets in ``POLICY_PRESETS``).
* ``value``       ``values, old_values, returns, mask``; ``ValueLossConfig``.
* ``preference``  ``chosen_logprobs, rejected_logprobs, chosen_mask, rejected_mask``
  [+ ``ref_chosen_logprobs``, ``ref_rejected_logprobs``]; ``PreferenceLossConfig``.
* ``sft``         ``logprobs, mask``; ``SFTLossConfig``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from diptych.core.losses.common import (
    AGGREGATIONS,
    LossInputError,
    aggregate,
    finalize_metrics,
    reduce_loss,
    sum_metrics,
)
from diptych.core.losses.policy import POLICY_PRESETS, PolicyLossConfig, kl_estimate, policy_loss, policy_preset
from diptych.core.losses.preference import PREFERENCE_KINDS, PreferenceLossConfig, preference_loss
from diptych.core.losses.sft import SFTLossConfig, sft_loss
from diptych.core.losses.value import ValueLossConfig, value_loss

LossFn = Callable[[Mapping[str, Any], Any], tuple[Any, Any, dict[str, Any]]]

LOSSES: dict[str, LossFn] = {
    "policy": policy_loss,
    "value": value_loss,
    "preference": preference_loss,
    "sft": sft_loss,
}
LOSS_CONFIGS: dict[str, type] = {
    "policy": PolicyLossConfig,
    "value": ValueLossConfig,
    "preference": PreferenceLossConfig,
    "sft": SFTLossConfig,
}


def get_loss(name: str) -> LossFn:
    """The loss registered as ``name``; an unknown name lists the choices."""
    if name not in LOSSES:
        raise KeyError(f"Unknown loss {name!r}; registered losses: {', '.join(sorted(LOSSES))}.")
    return LOSSES[name]


def register_loss(name: str, config_cls: type) -> Callable[[LossFn], LossFn]:
    """Decorator adding a loss (and its config class) to the registry under ``name``."""

    def deco(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise KeyError(f"A loss named {name!r} is already registered.")
        LOSSES[name] = fn
        LOSS_CONFIGS[name] = config_cls
        return fn

    return deco


__all__ = [
    "AGGREGATIONS",
    "LOSSES",
    "LOSS_CONFIGS",
    "POLICY_PRESETS",
    "PREFERENCE_KINDS",
    "LossInputError",
    "PolicyLossConfig",
    "PreferenceLossConfig",
    "SFTLossConfig",
    "ValueLossConfig",
    "aggregate",
    "finalize_metrics",
    "get_loss",
    "kl_estimate",
    "policy_loss",
    "policy_preset",
    "preference_loss",
    "reduce_loss",
    "register_loss",
    "sft_loss",
    "sum_metrics",
    "value_loss",
]
