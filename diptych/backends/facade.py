"""The part of a Backend that is the same on every panel: routing each call to its module.

Each backend package (``diptych.backends.jax``, ``diptych.backends.torch``) keeps one module
per concern, file for file: ``model``, ``recurrent``, ``sampler``, ``train``, ``checkpoint``.
A backend class only says which package it is and how arrays cross the boundary; every
other method of the :class:`diptych.core.backend.Backend` protocol is this routing, written once,
with the protocol's signatures (plus ``**kw`` for a backend's own options). Modules are imported on
first use so that both frameworks can live in one process and a missing one fails late.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from diptych.core.backend import ADAPTER_DIR, AdaptersOff, Array, Model, TrainState  # noqa: F401 (re-exported)
from diptych.core.mesh import check_remat
from diptych.core.model_types import is_recurrent

if TYPE_CHECKING:
    from diptych.core.lora import LoRAConfig
    from diptych.core.optim import OptimConfig
    from diptych.core.sampling import Rollout, SamplingConfig
    from diptych.core.spec import DecoderSpec


def model_module(package: str, spec_or_model: Any) -> ModuleType:
    """The module implementing a spec or model: ``recurrent`` for recurrent-depth ones, else ``model``."""
    return importlib.import_module(f"{package}.{'recurrent' if is_recurrent(spec_or_model) else 'model'}")


def set_remat(package: str, model: Any, remat: str) -> None:
    """``remat`` on a decoder (per-layer activation checkpointing); a recurrent-depth model already recomputes
    each core iteration under truncated backprop, so it only has the mode checked."""
    check_remat(remat)
    setter = getattr(model_module(package, model), "set_remat", None)
    if setter is not None:
        setter(model, remat)


def model_dtype(model: Any) -> str:
    """A model's dtype name (``"float32"`` / ``"bfloat16"``): a decoder keeps it as ``dtype``, a recurrent model as
    ``dtype_name`` (its ``dtype`` is the framework's)."""
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, str) else model.dtype_name


# -- what both panels' checkpoint modules share -----------------------------------------------
def read_checkpoint(path: Path, backend: str) -> tuple[dict[str, Any], Any, OptimConfig, dict[str, Any]]:
    """``(metadata, spec, optim, build options)`` of a checkpoint ``backend`` wrote, refusing the other backend's
    with the ``diptych convert`` line that turns it into this one. A decoder is rebuilt with its kernels mode; a
    recurrent-depth model has none (its depth is set per step)."""
    from diptych.core import checkpointing as ckpt

    meta = ckpt.read_metadata(path)
    if meta["backend"] != backend:
        raise ckpt.CheckpointError(
            f"{path} is a {meta['backend']} checkpoint; restore it with that backend, or convert it first: "
            f"diptych convert {path} OUT --to {backend}")
    kernels = meta.get("kernels")
    return meta, ckpt.spec_from_metadata(meta), ckpt.optim_from_metadata(meta), ({"kernels": kernels} if kernels
                                                                                 else {})


def checkpoint_extra(model: Model, value_head: bool, lora: LoRAConfig | None = None) -> dict[str, Any]:
    """What ``restore`` needs besides spec and optimizer to rebuild the state: whether a value head is stored,
    the decoder's kernels mode and the LoRA config (None: full fine-tuning)."""
    return {"value_head": value_head, "kernels": getattr(model, "kernels", None),
            "lora": dataclasses.asdict(lora) if lora is not None else None}


def lora_from_metadata(meta: Mapping[str, Any]) -> LoRAConfig | None:
    """The LoRA config a checkpoint was trained with (None: full fine-tuning, or a checkpoint older than LoRA)."""
    from diptych.core.lora import LoRAConfig

    saved = meta.get("lora")
    return LoRAConfig(**saved) if saved else None


@contextlib.contextmanager
def base_only(package: str, model: Any) -> Any:
    """``model`` itself, or, for an :class:`AdaptersOff` handle, its model with the adapters switched off."""
    if not isinstance(model, AdaptersOff):
        yield model
        return
    with importlib.import_module(f"{package}.lora").adapters_disabled(model.model):
        yield model.model


def lora_config(package: str, model: Any) -> LoRAConfig | None:
    """``model``'s LoRA config, None for a plain model (and without importing the LoRA module when no adapter
    can be there: a model built before any ``apply_lora`` call)."""
    if isinstance(model, AdaptersOff):
        model = model.model
    try:
        lora = importlib.import_module(f"{package}.lora")
    except ModuleNotFoundError as e:  # pragma: no cover - a backend without LoRA
        if e.name != f"{package}.lora":
            raise
        return None
    return lora.lora_config(model)


def base_weights(package: str, model: Any) -> dict[str, np.ndarray]:
    """Canonical float32 weights of ``model``; of a LoRA model, its base (NF4 dequantised), adapters left out."""
    if lora_config(package, model) is not None:
        return importlib.import_module(f"{package}.lora").base_weights(model)
    return model_module(package, model).export(model)


class Facade:
    """Every Backend method except the array boundary, delegated to ``{package}.{concern}``."""

    name: str
    package: str

    def _module(self, concern: str) -> ModuleType:
        return importlib.import_module(f"{self.package}.{concern}")

    def _impl(self, spec_or_model: Any) -> ModuleType:
        return model_module(self.package, spec_or_model)

    # -- foundation -----------------------------------------------------------------------
    def build(self, spec: DecoderSpec, weights: dict[str, np.ndarray], dtype: str = "float32",
              **options: Any) -> Model:
        """Instantiate ``spec`` with canonical weights; ``options``: ``kernels``, a torch ``device``, a depth."""
        return self._impl(spec).build(spec, weights, dtype=dtype, **options)

    def export(self, model: Model) -> dict[str, np.ndarray]:
        """The canonical ``{hf_name: float32 array}`` weights of ``model`` (a LoRA model's base)."""
        with base_only(self.package, model) as m:
            return base_weights(self.package, m)

    def forward(self, model: Model, tokens: Array, attention_mask: Array | None = None, **kw: Any) -> Array:
        """Logits ``[B, T, V]`` float32 of a left-padded batch."""
        with base_only(self.package, model) as m:
            return self._impl(m).forward(m, tokens, attention_mask, **kw)

    def logprobs(self, model: Model, tokens: Array, attention_mask: Array | None, targets: Array,
                 temperature: float = 1.0, **kw: Any) -> Array:
        """Per-token target log-probs ``[B, T]`` float32 of ``softmax(logits / temperature)``."""
        with base_only(self.package, model) as m:
            return self._impl(m).logprobs(m, tokens, attention_mask, targets, temperature, **kw)

    def set_depth(self, model: Model, num_steps: int | None = None, num_grad_steps: int | None = None) -> Model:
        """Recurrent-depth models: the depth r (and backprop depth k) the next calls use."""
        target = model.model if isinstance(model, AdaptersOff) else model
        self._module("recurrent").set_depth(target, num_steps, num_grad_steps)
        return model

    # -- generation -----------------------------------------------------------------------
    def generate(self, model: Model, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 **kw: Any) -> Rollout:
        """Sample completions: a recurrent model through its own loop, a decoder through ``sampler``."""
        with base_only(self.package, model) as m:
            if is_recurrent(m):
                return self._impl(m).generate(m, prompts, sampling, **kw)
            return self._module("sampler").generate(m, prompts, sampling, **kw)

    # -- adapters -------------------------------------------------------------------------
    def apply_lora(self, model: Model, cfg: LoRAConfig, *, adapters: dict[str, np.ndarray] | None = None,
                   seed: int = 0) -> Model:
        """LoRA adapters on ``model``'s target linears, the base frozen (``{package}.lora.apply_lora``)."""
        return self._module("lora").apply_lora(model, cfg, adapters=adapters, seed=seed)

    def export_adapters(self, model: Model) -> dict[str, np.ndarray]:
        """A LoRA model's adapters by canonical (PEFT) name."""
        return self._module("lora").export_adapters(model)

    def merged_weights(self, model: Model) -> dict[str, np.ndarray]:
        """A LoRA model's canonical weights with the adapters merged into the base."""
        return self._module("lora").merged_weights(model)

    def lora_config(self, model: Model) -> LoRAConfig | None:
        """The LoRA config of ``model``; None for a model without adapters."""
        return lora_config(self.package, model)

    # -- trainers -------------------------------------------------------------------------
    def init_train_state(self, model: Model, optim: OptimConfig, *, value_head: bool = False, seed: int = 0,
                         **kw: Any) -> TrainState:
        """Wrap ``model`` for training (AdamW; a value head for PPO)."""
        return self._module("train").init_train_state(model, optim, value_head=value_head, seed=seed, **kw)

    def train_step(self, state: TrainState, microbatches: Sequence[Mapping[str, np.ndarray]],
                   loss: str | Mapping[str, float], loss_config: Any, *, temperature: float = 1.0,
                   **kw: Any) -> tuple[TrainState, dict[str, float]]:
        """One optimizer update; see ``diptych.backends.<name>.train.train_step``."""
        return self._module("train").train_step(state, microbatches, loss, loss_config, temperature=temperature,
                                                **kw)

    def gradients(self, state: TrainState, microbatches: Sequence[Mapping[str, np.ndarray]],
                  loss: str | Mapping[str, float], loss_config: Any, *, temperature: float = 1.0,
                  **kw: Any) -> tuple[dict[str, np.ndarray], float]:
        """The full-batch gradient (canonical names) and loss, without updating: for parity checks."""
        return self._module("train").gradients(state, microbatches, loss, loss_config, temperature=temperature,
                                               **kw)

    def values(self, state: TrainState, tokens: Array, attention_mask: Array) -> Array:
        """Value-head predictions ``[B, T-1]`` (PPO old values); needs ``init_train_state(value_head=True)``."""
        return self._module("train").values(state, tokens, attention_mask)

    def export_weights(self, state: TrainState) -> dict[str, np.ndarray]:
        """Canonical HF-named float32 weights of a train state (the master weights)."""
        return self._module("train").export_weights(state)

    # -- checkpoints ----------------------------------------------------------------------
    def save(self, state: TrainState, path: str | os.PathLike[str], *, metadata: dict[str, Any] | None = None,
             keep_last: int | None = None) -> Path:
        """Write ``state`` (and ``metadata``) atomically to ``path``."""
        return self._module("checkpoint").save(state, path, metadata=metadata, keep_last=keep_last)

    def restore(self, path: str | os.PathLike[str], **kw: Any) -> tuple[TrainState, dict[str, Any]]:
        """Load ``(state, metadata)`` written by :meth:`save` (torch takes ``device=``)."""
        return self._module("checkpoint").restore(path, **kw)
