"""Optimizer settings and the learning-rate schedule, written once for both backends.

Both backends run AdamW with decoupled weight decay (``optax.adamw`` on JAX,
``torch.optim.AdamW`` on torch; the two are the same update when configured alike:
``p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)``). The schedule is evaluated
here in plain Python/numpy and handed to the backend as a number each step, so the two
backends can never disagree on the learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from diptych.core.config import ConfigError


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + global-norm clipping + warmup/decay schedule + optional bf16 mixed precision.

    Gradient accumulation: a train step receives a list of micro-batches; the loss sums and
    denominators of all of them are accumulated and divided once, so one call of
    ``train_step`` is one optimizer update whatever the number of micro-batches.
    ``grad_accum`` only records how trainers should split a batch (``split_microbatches``).

    ``mixed_precision="bf16"`` keeps float32 master weights and Adam moments in the train
    state and runs the model's forward and backward in bfloat16.
    ``max_grad_norm <= 0`` disables clipping (the norm is still reported).
    ``decay_1d=False`` exempts 1-D parameters (norm weights, biases) from weight decay.
    """

    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_1d: bool = False
    warmup_steps: int = 0
    total_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    mixed_precision: Literal["none", "bf16"] = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}.")
        if self.lr < 0:
            raise ConfigError(f"optim.lr must be >= 0, got {self.lr}.")
        if self.eps <= 0:
            raise ConfigError(f"optim.eps must be > 0, got {self.eps}.")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}.")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ConfigError(f"optim.schedule must be 'constant', 'linear' or 'cosine', got {self.schedule!r}.")
        if self.schedule != "constant" and self.total_steps <= self.warmup_steps:
            raise ConfigError(
                f"optim.schedule={self.schedule!r} decays from warmup_steps ({self.warmup_steps}) to total_steps "
                f"({self.total_steps}); set total_steps > warmup_steps, or use schedule='constant'."
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        if self.grad_accum < 1:
            raise ConfigError(f"optim.grad_accum must be >= 1, got {self.grad_accum}.")
        if self.mixed_precision not in ("none", "bf16"):
            raise ConfigError(f"optim.mixed_precision must be 'none' or 'bf16', got {self.mixed_precision!r}.")


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer update number ``step`` (0-based).

    Linear warmup from ``lr / warmup_steps`` up to ``lr`` over the first ``warmup_steps``
    updates (so update 0 never has lr 0), then constant, or linear / cosine decay to
    ``min_lr_ratio * lr`` at ``total_steps``, held there afterwards.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    base = float(cfg.lr)
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return base
    span = cfg.total_steps - cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base * (floor + (1.0 - floor) * factor)
