"""PPO value-function loss with optional clipping around the old values.

    V_clip = V_old + clip(V - V_old, -c, c)
    L      = 0.5 * max((V - R)^2, (V_clip - R)^2)         (clip = c)
    L      = 0.5 * (V - R)^2                              (clip = None)

The clipped form follows OpenAI baselines' PPO2 (Schulman et al. 2017; studied in Engstrom et al.
2020, "Implementation matters in deep policy gradients"), as TRL and verl use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

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
from diptych.core.losses.registry import VALUE_LAYOUT, register_loss

Array = Any


@dataclasses.dataclass(frozen=True)
class ValueLossConfig:
    """``clip``: half-width of the trust region around the old values (TRL 0.2, verl 0.5); None disables it."""

    clip: float | None = 0.2
    aggregation: Aggregation = "token_mean"
    norm_length: int | None = None
    allow_empty_sequences: bool = False

    def __post_init__(self) -> None:
        if self.clip is not None and self.clip <= 0:
            raise ConfigError(f"value clip must be > 0 or None, got {self.clip}.")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}.")


@register_loss("value", config=ValueLossConfig, layout=VALUE_LAYOUT, needs=("values",))
def value_loss(batch: Mapping[str, Array], cfg: ValueLossConfig) -> tuple[Array, Array, dict[str, Array]]:
    """Clipped squared error of per-token values against returns; metrics ``vf_loss``, ``vf_clipfrac``,
    ``value``, ``returns`` (sums with ``_count``)."""
    v = X.upcast(require(batch, "values"))
    if v.ndim != 2:
        raise LossInputError(f"batch['values'] must be [batch, time], got shape {tuple(v.shape)}.")
    xp = X.namespace(v)
    mask = token_mask(batch, "mask", v, "values", cfg.allow_empty_sequences)

    def token_input(key: str) -> Array:
        x = X.as_like(require(batch, key), v)
        check_shape(key, x, tuple(v.shape), "values")
        return masked_input(x, mask, key)

    v = masked_input(v, mask, "values")
    old, ret = token_input("old_values"), token_input("returns")
    err = (v - ret) ** 2
    metrics: dict[str, Array] = {}
    if cfg.clip is None:
        per_token = 0.5 * err
        token_metric(metrics, "vf_clipfrac", xp.zeros_like(v), mask)
    else:
        v_clip = old + xp.clip(v - old, -cfg.clip, cfg.clip)
        err_clip = (v_clip - ret) ** 2
        active = err_clip > err
        per_token = 0.5 * xp.where(active, err_clip, err)
        token_metric(metrics, "vf_clipfrac", xp.astype(active, v.dtype), mask)
    total, denom = aggregate(per_token, mask, cfg.aggregation, cfg.norm_length)
    token_metric(metrics, "vf_loss", per_token, mask)
    token_metric(metrics, "value", v, mask)
    token_metric(metrics, "returns", ret, mask)
    return total, denom, metrics
