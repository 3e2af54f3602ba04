"""Supervised fine-tuning: maximise the log-likelihood of completions given prompts.

Backend-neutral: the loop sees the backend only through ``init_train_state`` /
``train_step``; the loss is ``diptych.core.losses`` ``"sft"`` (token-mean NLL over
completion tokens, divided once over the whole batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from diptych.core.config import with_renamed_fields
from diptych.core.lora import LoRAConfig
from diptych.core.losses import SFTLossConfig
from diptych.core.mesh import MeshConfig
from diptych.core.metrics import MetricsLogger
from diptych.core.optim import OptimConfig
from diptych.core.train_batch import split_microbatches
from diptych.core.trainers.base import (
    DivergenceGuard,
    TrainerError,
    batch_iterator,
    check_loop_fields,
    encode_prompts,
    loop_guard,
    pack_sequences,
)


@with_renamed_fields
@dataclass
class SFTConfig:
    """Names follow TRL's SFTConfig where the knob is the same (docs/coming_from_trl.md)."""

    steps: int = 100
    batch_size: int = 32
    micro_batches: int = 1
    max_prompt_length: int = 32
    max_completion_length: int = 32
    seed: int = 0
    max_consecutive_skips: int = 3
    """Stop the run (DivergenceError) after this many steps in a row skipped for a non-finite loss or gradient."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=0))
    mesh: MeshConfig | None = None
    """Devices ``{data, fsdp, tensor}`` (``diptych.core.mesh``); None: every local device (JAX) or the whole
    ``torchrun`` job, on ``fsdp``."""
    remat: Literal["none", "layer"] = "none"
    """Activation checkpointing: ``layer`` recomputes each decoder layer in the backward."""
    lora: LoRAConfig | None = None
    """Adapters (``diptych.core.lora``): ``lora: {r: 16, alpha: 32}`` trains LoRA on a frozen base, ``quantize_base:
    nf4`` QLoRA; None trains every weight."""

    _renamed: ClassVar[dict[str, str]] = {"max_prompt_len": "max_prompt_length",
                                          "max_completion_len": "max_completion_length"}

    def __post_init__(self) -> None:
        check_loop_fields(self)
        if self.batch_size % self.micro_batches:
            raise TrainerError(f"batch_size ({self.batch_size}) must be divisible by micro_batches "
                               f"({self.micro_batches}).")


def sft_rows_to_batch(tokenizer: Any, rows: Sequence[dict[str, Any]], cfg: SFTConfig) -> dict:
    """``{"prompt", "completion"}`` rows -> a fixed-width SFT batch; EOS closes each completion."""
    for r in rows:
        if "prompt" not in r or "completion" not in r:
            raise TrainerError(f"SFT rows need 'prompt' and 'completion' columns; got {sorted(r)}.")
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows], cfg.max_prompt_length)
    completions = [[*list(tokenizer.encode(r["completion"]))[:cfg.max_completion_length - 1], tokenizer.eos_id]
                   for r in rows]
    return pack_sequences(prompts, completions, cfg.max_prompt_length + cfg.max_completion_length, tokenizer.pad_id)


def train_sft(backend: Any, state: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], cfg: SFTConfig,
              logger: MetricsLogger | None = None, start_step: int = 0, guard: DivergenceGuard | None = None) -> Any:
    """Run ``cfg.steps`` SFT updates on ``state`` and return it (``guard``: the divergence policy)."""
    guard = loop_guard(guard, cfg)
    batches = batch_iterator(rows, cfg.batch_size, cfg.seed, start=start_step)
    for step in range(start_step, cfg.steps):
        _, chunk = next(batches)
        batch = sft_rows_to_batch(tokenizer, chunk, cfg)
        state, metrics = backend.train_step(state, split_microbatches(batch, cfg.micro_batches), "sft",
                                            SFTLossConfig())
        if logger is not None:
            logger.log(step + 1, metrics)
        guard.check(step + 1, metrics, state)
    return state
