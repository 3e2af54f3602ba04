"""Every loss written once over the Array API, so JAX and torch run the same lines.

A loss is a pure function ``loss(batch, cfg) -> (unreduced_sum, denominator, metrics)`` where
``batch`` maps names to arrays of one library (numpy inputs are moved next to the log-probs).
The trainer sums ``unreduced_sum`` and ``denominator`` over micro-batches and devices and calls
``reduce_loss`` once (DESIGN.md rule 3). Metrics are sums with ``<name>_count`` companions:
accumulate with ``sum_metrics`` and turn into means with ``finalize_metrics``.

Registry (``diptych.core.losses.registry``): ``register_loss(name, config=, layout=, needs=)`` records a
:class:`LossSpec` (function, config class, batch layout, needed model outputs) in ``LOSS_SPECS``; the
train step reads it, so a newly registered loss trains without touching the backends. ``get_loss(name)``
gives the function, ``loss_spec(name)`` the whole declaration. The built-ins:

* ``policy``      ``logprobs, old_logprobs, advantages, mask`` [+ ``ref_logprobs``, ``sampler_logprobs``,
  ``entropy``]; ``PolicyLossConfig`` (named presets in ``POLICY_PRESETS``). A micro-batch may omit
  ``old_logprobs``: the step then feeds the detached current ``logprobs``.
* ``value``       ``values, old_values, returns, mask``; ``ValueLossConfig``.
* ``preference``  ``chosen_logprobs, rejected_logprobs, chosen_mask, rejected_mask``
  [+ ``ref_chosen_logprobs``, ``ref_rejected_logprobs``]; ``PreferenceLossConfig``.
* ``sft``         ``logprobs, mask``; ``SFTLossConfig``.
* ``trajectory``  the policy loss on recurrent models' per-iteration log-probs (RLTT); ``TrajectoryLossConfig``.
"""

from __future__ import annotations

from diptych.core.losses.common import (
    AGGREGATIONS,
    LossInputError,
    aggregate,
    finalize_metrics,
    reduce_loss,
    sum_metrics,
)
from diptych.core.losses.offpolicy import OffPolicyLossConfig, offpolicy_loss
from diptych.core.losses.policy import POLICY_PRESETS, PolicyLossConfig, kl_estimate, policy_loss, policy_preset
from diptych.core.losses.preference import PREFERENCE_KINDS, PreferenceLossConfig, preference_loss
from diptych.core.losses.registry import (
    DETACHED,
    LOSS_CONFIGS,
    LOSS_SPECS,
    LOSSES,
    MODEL_OUTPUTS,
    POLICY_LAYOUT,
    PREFERENCE_LAYOUT,
    SFT_LAYOUT,
    VALUE_LAYOUT,
    BatchLayout,
    LossFn,
    LossSpec,
    get_loss,
    loss_spec,
    merge_layouts,
    register_loss,
    unregister_loss,
)
from diptych.core.losses.sft import SFTLossConfig, sft_loss
from diptych.core.losses.trajectory import TrajectoryCredit, TrajectoryLossConfig, trajectory_loss
from diptych.core.losses.value import ValueLossConfig, value_loss

__all__ = [
    "AGGREGATIONS",
    "DETACHED",
    "LOSSES",
    "LOSS_CONFIGS",
    "LOSS_SPECS",
    "MODEL_OUTPUTS",
    "POLICY_LAYOUT",
    "POLICY_PRESETS",
    "PREFERENCE_KINDS",
    "PREFERENCE_LAYOUT",
    "SFT_LAYOUT",
    "VALUE_LAYOUT",
    "BatchLayout",
    "LossFn",
    "LossInputError",
    "LossSpec",
    "OffPolicyLossConfig",
    "PolicyLossConfig",
    "PreferenceLossConfig",
    "SFTLossConfig",
    "TrajectoryCredit",
    "TrajectoryLossConfig",
    "ValueLossConfig",
    "aggregate",
    "finalize_metrics",
    "get_loss",
    "kl_estimate",
    "loss_spec",
    "merge_layouts",
    "offpolicy_loss",
    "policy_loss",
    "policy_preset",
    "preference_loss",
    "reduce_loss",
    "register_loss",
    "sft_loss",
    "sum_metrics",
    "trajectory_loss",
    "unregister_loss",
    "value_loss",
]
