"""The loss registry: every loss says, where it is registered, what batch it reads and what the model must give it.

A train step runs a registered loss it has never heard of: the loss's :class:`LossSpec` names the
batch layout (required and optional micro-batch keys, which of them are per-token and against which
token array, which are integer model inputs) and the model outputs it needs (``logprobs``,
``entropy``, ``values``, ``chosen_logprobs``, ``rejected_logprobs``, or a ``detached_`` copy of one),
possibly depending on its config (entropy only when ``entropy_coef != 0``). ``diptych.core.train_batch``
validates micro-batches from these declarations and the backends compute exactly the declared outputs,
so adding a loss is one decorated function::

    @register_loss("cispo", config=CISPOConfig, layout=POLICY_LAYOUT, needs=("logprobs", "detached_logprobs"))
    def cispo_loss(batch, cfg): ...

This module imports nothing from the loss modules (they import it to register themselves).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

LossFn = Callable[[Mapping[str, Any], Any], tuple[Any, Any, dict[str, Any]]]

MODEL_OUTPUTS: Mapping[str, str] = MappingProxyType({
    "logprobs": "tokens",
    "entropy": "tokens",
    "values": "tokens",
    "chosen_logprobs": "chosen_tokens",
    "rejected_logprobs": "rejected_tokens",
    "iteration_logprobs": "tokens",
})
"""Every differentiable quantity a backend can compute for a loss, and the token array it is computed on
(``[B, T - 1]`` each, position ``t`` scoring target ``tokens[:, t + 1]``; ``iteration_logprobs`` of a
recurrent-depth model is ``[B, k, T - 1]``, one row per differentiated iteration)."""

DETACHED = "detached_"
"""A loss may also need ``detached_<output>`` (e.g. ``detached_logprobs``): the same values with no gradient,
for the clipped importance weights some losses hold constant (CISPO's ``sg(min(r, 1 + eps))``). The Array API
has no stop-gradient, so the backend applies its own and the loss stays framework-free."""


def is_model_output(name: str) -> bool:
    """Whether ``name`` is a model output a loss may declare (one of :data:`MODEL_OUTPUTS` or its detached copy)."""
    return name in MODEL_OUTPUTS or (name.startswith(DETACHED) and name[len(DETACHED):] in MODEL_OUTPUTS)


def _frozen(m: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(m or {}))


@dataclasses.dataclass(frozen=True, eq=False)
class BatchLayout:
    """The micro-batch keys a loss reads. ``per_token`` maps a key to the token array whose ``[B, T - 1]``
    shape it must have; ``per_row_or_token`` keys may also be ``[B]`` (one value per sequence, e.g. GRPO
    advantages). ``int_keys`` are model inputs: cast to integers and never handed to the loss.
    ``detached_defaults`` maps an optional key to a model output: when the key is absent the backend feeds
    the loss ``stop_gradient(output)`` in its place (``old_logprobs`` on the first of one GRPO iteration,
    where the old policy is the current one)."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    per_token: Mapping[str, str] = dataclasses.field(default_factory=dict)
    per_row_or_token: Mapping[str, str] = dataclasses.field(default_factory=dict)
    int_keys: tuple[str, ...] = ()
    detached_defaults: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("per_token", "per_row_or_token", "detached_defaults"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        keys = set(self.required) | set(self.optional)
        for name in ("per_token", "per_row_or_token"):
            for key, tok in getattr(self, name).items():
                if key not in keys or tok not in keys:
                    raise ValueError(f"BatchLayout.{name} names {key!r} -> {tok!r}; both must be required or "
                                     "optional keys of the layout.")
        for key in self.int_keys:
            if key not in keys:
                raise ValueError(f"BatchLayout.int_keys names {key!r}, which is not a key of the layout.")
        for key, out in self.detached_defaults.items():
            if key not in self.optional or out not in MODEL_OUTPUTS:
                raise ValueError(f"BatchLayout.detached_defaults maps {key!r} -> {out!r}: the key must be optional "
                                 f"and the value one of {', '.join(MODEL_OUTPUTS)}.")

    def keys(self) -> tuple[str, ...]:
        return self.required + tuple(k for k in self.optional if k not in self.required)


def merge_layouts(layouts: Iterable[BatchLayout]) -> BatchLayout:
    """The layout of a composite loss: the union of its terms' layouts (a key required by one term is required)."""
    layouts = list(layouts)
    required = tuple(dict.fromkeys(k for lay in layouts for k in lay.required))
    optional = tuple(dict.fromkeys(k for lay in layouts for k in lay.optional if k not in required))
    merged: dict[str, dict[str, str]] = {"per_token": {}, "per_row_or_token": {}, "detached_defaults": {}}
    for lay in layouts:
        for name, table in merged.items():
            table.update(getattr(lay, name))
    defaults = {k: v for k, v in merged["detached_defaults"].items() if k in optional}
    return BatchLayout(required=required, optional=optional, per_token=merged["per_token"],
                       per_row_or_token=merged["per_row_or_token"],
                       int_keys=tuple(dict.fromkeys(k for lay in layouts for k in lay.int_keys)),
                       detached_defaults=defaults)


_TOKENS = ("tokens", "attention_mask")

SFT_LAYOUT = BatchLayout(required=(*_TOKENS, "mask"), per_token={"mask": "tokens"}, int_keys=_TOKENS)
"""``tokens``, ``attention_mask`` ``[B, T]`` and the loss ``mask`` ``[B, T - 1]``."""

POLICY_LAYOUT = BatchLayout(
    required=(*_TOKENS, "mask", "advantages"),
    optional=("old_logprobs", "ref_logprobs", "sampler_logprobs"),
    per_token={k: "tokens" for k in ("mask", "old_logprobs", "ref_logprobs", "sampler_logprobs")},
    per_row_or_token={"advantages": "tokens"},
    int_keys=_TOKENS,
    detached_defaults={"old_logprobs": "logprobs"},
)
"""GRPO family / PPO actor. ``old_logprobs`` may be omitted when the old policy is the current one
(one iteration per batch): the backend then uses the detached current log-probs."""

VALUE_LAYOUT = BatchLayout(
    required=(*_TOKENS, "mask", "old_values", "returns"),
    per_token={k: "tokens" for k in ("mask", "old_values", "returns")},
    int_keys=_TOKENS,
)
"""PPO critic (needs ``init_train_state(..., value_head=True)``)."""

_PAIR = ("chosen_tokens", "chosen_attention_mask", "chosen_mask", "rejected_tokens", "rejected_attention_mask",
         "rejected_mask")
PREFERENCE_LAYOUT = BatchLayout(
    required=_PAIR,
    optional=("ref_chosen_logprobs", "ref_rejected_logprobs"),
    per_token={"chosen_mask": "chosen_tokens", "ref_chosen_logprobs": "chosen_tokens",
               "rejected_mask": "rejected_tokens", "ref_rejected_logprobs": "rejected_tokens"},
    int_keys=("chosen_tokens", "chosen_attention_mask", "rejected_tokens", "rejected_attention_mask"),
)
"""DPO family: both sides of each pair, with reference log-probs cached once by the trainer."""

Needs = tuple[str, ...] | Callable[[Any], Iterable[str]]


@dataclasses.dataclass(frozen=True, eq=False)
class LossSpec:
    """A registered loss: its function, config class, batch layout and needed model outputs."""

    name: str
    fn: LossFn
    config: type | None
    layout: BatchLayout
    needs: Needs

    def outputs(self, cfg: Any) -> frozenset[str]:
        """The model outputs this loss needs under ``cfg``."""
        needs = self.needs(cfg) if callable(self.needs) else self.needs
        out = frozenset(needs)
        unknown = {n for n in out if not is_model_output(n)}
        if unknown:
            raise ValueError(f"Loss {self.name!r} needs unknown model outputs {', '.join(sorted(unknown))}; "
                             f"choose from {', '.join(MODEL_OUTPUTS)} (or {DETACHED}<one of them>).")
        return out


LOSS_SPECS: dict[str, LossSpec] = {}
LOSSES: dict[str, LossFn] = {}
"""``{name: loss function}``, kept in step with ``LOSS_SPECS`` for callers that only want the function."""
LOSS_CONFIGS: dict[str, type | None] = {}


def register_loss(name: str, config: type | None = None, *, layout: BatchLayout | None = None,
                  needs: Needs | None = None, replace: bool = False) -> Callable[[LossFn], LossFn]:
    """Decorator adding a loss to the registry with what it reads (``layout``) and what the model must compute
    (``needs``: a tuple of :data:`MODEL_OUTPUTS` names, or ``cfg -> names``). ``replace=True`` overwrites."""
    if not isinstance(layout, BatchLayout) or needs is None:
        raise TypeError(
            f"register_loss({name!r}) needs layout=<BatchLayout> and needs=<model outputs> so that train_step knows "
            "its batch and what to compute, e.g. register_loss('cispo', config=CISPOConfig, layout=POLICY_LAYOUT, "
            "needs=('logprobs',))."
        )
    if not callable(needs):
        needs = tuple(needs)
        unknown = {n for n in needs if not is_model_output(n)}
        if unknown:
            raise ValueError(f"register_loss({name!r}): unknown model outputs {', '.join(sorted(unknown))}; "
                             f"choose from {', '.join(MODEL_OUTPUTS)} (or {DETACHED}<one of them>).")

    def deco(fn: LossFn) -> LossFn:
        if name in LOSS_SPECS and not replace:
            raise KeyError(f"A loss named {name!r} is already registered; pass replace=True to overwrite it.")
        LOSS_SPECS[name] = LossSpec(name=name, fn=fn, config=config, layout=layout, needs=needs)
        LOSSES[name] = fn
        LOSS_CONFIGS[name] = config
        return fn

    return deco


def unregister_loss(name: str) -> None:
    """Remove a registered loss (tests that register a throwaway loss clean up with this)."""
    for table in (LOSS_SPECS, LOSSES, LOSS_CONFIGS):
        table.pop(name, None)


def loss_spec(name: str) -> LossSpec:
    """The :class:`LossSpec` registered as ``name``; an unknown name lists the choices."""
    if name not in LOSS_SPECS:
        raise KeyError(f"Unknown loss {name!r}; registered losses: {', '.join(sorted(LOSS_SPECS))}.")
    return LOSS_SPECS[name]


def get_loss(name: str) -> LossFn:
    """The loss function registered as ``name``; an unknown name lists the choices."""
    return loss_spec(name).fn
