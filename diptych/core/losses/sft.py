"""Supervised fine-tuning: negative log-likelihood of the target tokens.

    L = -sum_{b,t} m[b,t] log p(y_t | y_<t)  /  sum_{b,t} m[b,t]     (token_mean, the default)

Token-mean over the *accumulated* batch: the classic gradient-accumulation bug (averaging
per-micro-batch means) cannot happen because the division happens once, in the trainer.
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
    masked_input,
    require,
    token_mask,
    token_metric,
)
from diptych.core.losses.registry import SFT_LAYOUT, register_loss

Array = Any


@dataclasses.dataclass(frozen=True)
class SFTLossConfig:
    """``aggregation`` defaults to a global token mean; ``seq_mean_token_mean`` weighs every example equally."""

    aggregation: Aggregation = "token_mean"
    norm_length: int | None = None
    allow_empty_sequences: bool = False

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}.")


@register_loss("sft", config=SFTLossConfig, layout=SFT_LAYOUT, needs=("logprobs",))
def sft_loss(batch: Mapping[str, Array], cfg: SFTLossConfig) -> tuple[Array, Array, dict[str, Array]]:
    """NLL of ``logprobs`` [B, T] on ``mask``; metric ``nll`` (sum with ``nll_count`` tokens)."""
    lp = X.upcast(require(batch, "logprobs"))
    if lp.ndim != 2:
        raise LossInputError(f"batch['logprobs'] must be [batch, time], got shape {tuple(lp.shape)}.")
    mask = token_mask(batch, "mask", lp, "logprobs", cfg.allow_empty_sequences)
    nll = -masked_input(lp, mask, "logprobs")
    total, denom = aggregate(nll, mask, cfg.aggregation, cfg.norm_length)
    metrics: dict[str, Array] = {}
    token_metric(metrics, "nll", nll, mask)
    return total, denom, metrics
