"""Direct preference optimisation (DPO and its family) as one backend-neutral loop.

The reference model is used exactly once: before training, its per-token log-probs of
every (prompt, chosen) and (prompt, rejected) row are computed and cached in a
:class:`ReferenceCache` (Tulu 3's trick), so the reference never shares memory with the
policy and a resumed run reloads the cache from disk instead of keeping a second model.
Reference-free kinds (``simpo``, ``orpo``) skip the cache altogether.

Rows are packed at a FIXED width (``max_prompt_length + max_completion_length``) independent of
the batch they land in, so a row's cached log-probs are valid in any later batch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from diptych.core.backend import AdaptersOff
from diptych.core.config import with_renamed_fields
from diptych.core.lora import LoRAConfig
from diptych.core.losses import PreferenceLossConfig
from diptych.core.losses.preference import PREFERENCE_KINDS, REFERENCE_FREE
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
    sequence_logprobs,
)

INDEX = "_row"
"""Column the loop adds to each row: its index into the reference cache."""


@with_renamed_fields
@dataclass
class DPOConfig:
    """Defaults follow TRL's DPOTrainer (sigmoid loss, beta 0.1) where sensible for a small model."""

    steps: int = 100
    batch_size: int = 16
    micro_batches: int = 1
    max_prompt_length: int = 32
    max_completion_length: int = 32
    loss_type: str = "sigmoid"
    """Preference loss: sigmoid | ipo | hinge | robust | sigmoid_norm | simpo | apo_zero | apo_down | orpo."""
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    """SimPO's target margin (TRL CPOConfig.simpo_gamma)."""
    orpo_lambda: float = 0.1
    precompute_ref_batch_size: int = 64
    """Rows per forward pass while precomputing the reference cache."""
    seed: int = 0
    max_consecutive_skips: int = 3
    """Stop the run (DivergenceError) after this many steps in a row skipped for a non-finite loss or gradient."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    mesh: MeshConfig | None = None
    """Devices ``{data, fsdp, tensor}`` (``diptych.core.mesh``); None: every local device (JAX) or the whole
    ``torchrun`` job, on ``fsdp``."""
    remat: Literal["none", "layer"] = "none"
    """Activation checkpointing: ``layer`` recomputes each decoder layer in the backward."""
    lora: LoRAConfig | None = None
    """Adapters (``diptych.core.lora``): ``lora: {r: 16, alpha: 32}`` trains LoRA on a frozen base, ``quantize_base:
    nf4`` QLoRA; None trains every weight."""

    _renamed: ClassVar[dict[str, str]] = {"max_prompt_len": "max_prompt_length",
                                          "max_completion_len": "max_completion_length", "kind": "loss_type",
                                          "gamma": "simpo_gamma", "ref_batch_size": "precompute_ref_batch_size"}

    def __post_init__(self) -> None:
        check_loop_fields(self)
        if self.loss_type not in PREFERENCE_KINDS:
            raise TrainerError(f"loss_type must be one of {', '.join(PREFERENCE_KINDS)}, got {self.loss_type!r}.")
        if self.batch_size < 1 or self.batch_size % self.micro_batches:
            raise TrainerError(f"batch_size ({self.batch_size}) must be a positive multiple of micro_batches "
                               f"({self.micro_batches}).")
        if self.max_completion_length < 2:
            raise TrainerError(f"max_completion_length must be >= 2 (one token plus EOS), got "
                               f"{self.max_completion_length}.")

    @property
    def width(self) -> int:
        return self.max_prompt_length + self.max_completion_length

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE

    def loss_config(self) -> PreferenceLossConfig:
        return PreferenceLossConfig(kind=self.loss_type, beta=self.beta, label_smoothing=self.label_smoothing,
                                    gamma=self.simpo_gamma, orpo_lambda=self.orpo_lambda)


def check_rows(rows: Sequence[dict[str, Any]]) -> None:
    """Fail before training when the rows are not preference pairs."""
    if not rows:
        raise TrainerError("The preference dataset is empty.")
    for i, r in enumerate(rows):
        missing = [c for c in ("prompt", "chosen", "rejected") if c not in r]
        if missing:
            raise TrainerError(f"Preference row {i} lacks column(s) {', '.join(missing)}; DPO needs prompt, chosen "
                               f"and rejected (it has {', '.join(sorted(r))}).")


def preference_batch(tokenizer: Any, rows: Sequence[dict[str, Any]], cfg: DPOConfig) -> dict[str, np.ndarray]:
    """Rows -> the ``preference`` micro-batch layout (``diptych.core.train_batch``); EOS closes each completion."""
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows], cfg.max_prompt_length)
    out: dict[str, np.ndarray] = {}
    for side in ("chosen", "rejected"):
        completions = [[*tokenizer.encode(str(r[side]))[: cfg.max_completion_length - 1], tokenizer.eos_id]
                       for r in rows]
        packed = pack_sequences(prompts, completions, cfg.width, tokenizer.pad_id)
        out[f"{side}_tokens"] = packed["tokens"]
        out[f"{side}_attention_mask"] = packed["attention_mask"]
        out[f"{side}_mask"] = packed["mask"]
    return out



@dataclass
class ReferenceCache:
    """Per-token reference log-probs of every row, ``[N, width - 1]`` per side (float32)."""

    chosen: np.ndarray
    rejected: np.ndarray

    @classmethod
    def compute(cls, backend: Any, ref_model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], cfg: DPOConfig
                ) -> ReferenceCache:
        """One pass of the reference over the dataset; afterwards ``ref_model`` may be dropped."""
        check_rows(rows)
        sides: dict[str, list[np.ndarray]] = {"chosen": [], "rejected": []}
        for i in range(0, len(rows), cfg.precompute_ref_batch_size):
            batch = preference_batch(tokenizer, rows[i:i + cfg.precompute_ref_batch_size], cfg)
            for side in sides:
                sides[side].append(sequence_logprobs(backend, ref_model, batch[f"{side}_tokens"],
                                                     batch[f"{side}_attention_mask"], batch[f"{side}_mask"]))
        return cls(np.concatenate(sides["chosen"]), np.concatenate(sides["rejected"]))

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary name, then rename), so a killed run never leaves half a cache."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
        np.savez(tmp, chosen=self.chosen, rejected=self.rejected)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, n_rows: int | None = None) -> ReferenceCache:
        with np.load(path) as f:
            cache = cls(f["chosen"], f["rejected"])
        if n_rows is not None and len(cache.chosen) != n_rows:
            raise TrainerError(f"Reference cache {path} holds {len(cache.chosen)} rows but the dataset has {n_rows}; "
                               "delete the cache to recompute it for this dataset.")
        return cache

    def take(self, index: Sequence[int]) -> dict[str, np.ndarray]:
        idx = np.asarray(index, np.int64)
        return {"ref_chosen_logprobs": self.chosen[idx], "ref_rejected_logprobs": self.rejected[idx]}


def dpo_step(backend: Any, state: Any, tokenizer: Any, rows: list[dict[str, Any]], cfg: DPOConfig,
             ref_cache: ReferenceCache | None) -> tuple[Any, dict[str, float]]:
    """One optimizer update on a batch of preference rows (each carrying its cache index in ``_row``)."""
    t0 = time.perf_counter()
    batch = preference_batch(tokenizer, rows, cfg)
    if cfg.needs_reference:
        if ref_cache is None:
            raise TrainerError(f"loss_type={cfg.loss_type!r} needs reference log-probs; pass ref_cache "
                               "(ReferenceCache.compute) or use a reference-free loss_type (simpo, orpo).")
        batch.update(ref_cache.take([r[INDEX] for r in rows]))
    state, metrics = backend.train_step(state, split_microbatches(batch, cfg.micro_batches), "preference",
                                        cfg.loss_config())
    seconds = time.perf_counter() - t0
    metrics = dict(metrics)
    metrics["time/train"] = seconds
    metrics["tokens_per_s"] = float(metrics.get("tokens", 0.0)) / max(seconds, 1e-9)
    metrics["completion_length"] = float((batch["chosen_mask"].sum() + batch["rejected_mask"].sum()) / (2 * len(rows)))
    return state, metrics


def evaluate_preferences(backend: Any, model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], cfg: DPOConfig,
                         ref_cache: ReferenceCache | None = None) -> dict[str, float]:
    """Implicit-reward accuracy and margin of ``model`` on ``rows`` (held-out pairs), as DPO defines them.

    The implicit reward is ``beta * (log pi(y|x) - log ref(y|x))`` summed over the completion;
    without a cache (or for reference-free kinds) it is ``beta * log pi(y|x)``. Ties count as wrong.
    """
    check_rows(rows)
    margins = []
    for i in range(0, len(rows), cfg.precompute_ref_batch_size):
        chunk = list(rows[i:i + cfg.precompute_ref_batch_size])
        batch = preference_batch(tokenizer, chunk, cfg)
        side_sum = {}
        for side in ("chosen", "rejected"):
            lp = sequence_logprobs(backend, model, batch[f"{side}_tokens"], batch[f"{side}_attention_mask"],
                                   batch[f"{side}_mask"]).sum(-1)
            if ref_cache is not None and cfg.needs_reference:
                ref = getattr(ref_cache, side)[np.arange(i, i + len(chunk))].sum(-1)
                lp = lp - ref
            side_sum[side] = cfg.beta * lp
        margins.append(side_sum["chosen"] - side_sum["rejected"])
    m = np.concatenate(margins)
    return {"eval/rewards_accuracy": float((m > 0).mean()), "eval/rewards_margin": float(m.mean())}


def index_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``rows`` carrying their position (the reference-cache index) in ``_row``."""
    return [{**r, INDEX: i} for i, r in enumerate(rows)]


def train_dpo(backend: Any, state: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], cfg: DPOConfig,
              logger: MetricsLogger | None = None, ref_cache: ReferenceCache | None = None, start_step: int = 0,
              on_step: Callable[[int, Any, dict[str, float]], None] | None = None,
              guard: DivergenceGuard | None = None) -> Any:
    """Run DPO from ``start_step`` to ``cfg.steps`` and return the state.

    Without ``ref_cache`` the reference is the policy as it is now (standard DPO: the SFT
    model; with ``cfg.lora``, its base with the adapters off), computed once here; a resumed run must pass the
    cache saved at the start.
    """
    check_rows(rows)
    guard = loop_guard(guard, cfg)
    if cfg.needs_reference and ref_cache is None:
        if start_step > 0:
            raise TrainerError("Resuming DPO needs the reference cache computed at step 0 (ref_cache=...); "
                               "the current policy is no longer the reference.")
        ref = AdaptersOff(state.model) if cfg.lora is not None else state.model  # LoRA: the base is the reference
        ref_cache = ReferenceCache.compute(backend, ref, tokenizer, rows, cfg)
    indexed = index_rows(rows)
    batches = batch_iterator(indexed, cfg.batch_size, cfg.seed, start=start_step)
    for step in range(start_step, cfg.steps):
        _, chunk = next(batches)
        state, metrics = dpo_step(backend, state, tokenizer, chunk, cfg, ref_cache)
        if logger is not None:
            logger.log(step + 1, metrics)
        guard.check(step + 1, metrics, state)
        if on_step is not None:
            on_step(step + 1, state, metrics)
    return state
