"""LoRA / QLoRA configuration: the ``lora:`` block of every trainer config.

Backend-neutral (no framework import). The adapter math, the canonical adapter form (PEFT's names and
``adapter_config.json``) and the numpy initialisation live here too; each backend applies adapters to its own
linear layers (``diptych.backends.{jax,torch}.lora``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The attention and MLP projections of the decoder families (PEFT's ``all-linear`` minus the head)."""


class LoRAError(ValueError):
    """A LoRA setting that cannot work on this model, with what to change."""


@dataclass
class LoRAConfig:
    """Adapters on the frozen base: ``W x + (alpha / r) * B A x`` (rsLoRA: ``alpha / sqrt(r)``).

    ``lora: None`` in a trainer config means full fine-tuning.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGETS)
    """Module-name patterns (a name's last component, or a regex matched against the full HF module name)."""
    use_rslora: bool = False
    quantize_base: Literal["none", "nf4"] = "none"
    """``nf4``: QLoRA, the frozen base stored as 4-bit NormalFloat (block size 64)."""
    double_quant: bool = False
    """QLoRA only: quantise the per-block absmax scales too (bitsandbytes' ``compress_statistics``)."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise LoRAError(f"lora.r must be >= 1, got {self.r}.")
        if not self.alpha > 0:
            raise LoRAError(f"lora.alpha must be > 0, got {self.alpha}.")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"lora.dropout must be in [0, 1), got {self.dropout}.")
        if not self.targets:
            raise LoRAError("lora.targets is empty: name at least one module (e.g. q_proj,v_proj).")
        self.targets = tuple(self.targets)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
