"""The one table of model types: which ``config.json`` ``model_type`` values diptych knows, and
what each one is. Everything that dispatches on a model type reads it here (spec validation,
HF folder loading in ``diptych.core.hf``, the backends' facade, parity, the CLI and its error
messages), so adding a family is one entry here plus its spec class in ``core.hf.SPEC_CLASSES``.
A decoder entry also says how its ``config.json`` differs from Llama's (the flags below), which is
all ``DecoderSpec`` and the backends need; docs/model_families.md walks through adding one.

This module imports nothing from diptych, so any module may import it without a cycle; the
spec classes are bound to families by ``diptych.core.hf``, which imports both spec modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Family = Literal["decoder", "recurrent"]


@dataclass(frozen=True)
class ModelType:
    """One ``model_type``: its spec family, the HF ``architectures`` entry it writes, and whether
    transformers can load it (the parity oracle)."""

    name: str
    family: Family
    architecture: str
    in_transformers: bool
    default_rope_theta: float = 10000.0
    """``rope_theta`` when the config has none (transformers' per-class ``default_theta``)."""
    qkv_bias: bool | None = None
    """q/k/v biases regardless of the config (Qwen2: True); None: the config's ``attention_bias``."""
    o_bias: bool = True
    """Whether ``attention_bias`` also puts a bias on ``o_proj`` (Llama, Mistral, Qwen3, SmolLM3; not Qwen2)."""
    qk_norm: bool = False
    """Per-head RMSNorm on q and k (Qwen3)."""
    sliding_window: bool = False
    """The config's ``sliding_window`` applies to every layer (Mistral), without a ``use_sliding_window``."""
    no_rope_layers: bool = False
    """Some layers skip RoPE, named by ``no_rope_layers`` / ``no_rope_layer_interval`` (SmolLM3)."""

    @property
    def recurrent(self) -> bool:
        return self.family == "recurrent"

    @property
    def backend_module(self) -> str:
        """The module of each backend package that builds and runs this type."""
        return "recurrent" if self.recurrent else "model"


HUGINN = "huginn_raven"

MODEL_TYPES: dict[str, ModelType] = {
    t.name: t
    for t in (
        ModelType("llama", "decoder", "LlamaForCausalLM", True),
        ModelType("qwen2", "decoder", "Qwen2ForCausalLM", True, qkv_bias=True, o_bias=False),
        ModelType("qwen3", "decoder", "Qwen3ForCausalLM", True, qk_norm=True),
        ModelType("mistral", "decoder", "MistralForCausalLM", True, sliding_window=True),
        ModelType("smollm3", "decoder", "SmolLM3ForCausalLM", True, default_rope_theta=2_000_000.0,
                  no_rope_layers=True),
        ModelType(HUGINN, "recurrent", "RavenForCausalLM", False),
    )
}
"""model_type -> what it is, in the order the docs list them."""

DECODER_MODEL_TYPES: tuple[str, ...] = tuple(n for n, t in MODEL_TYPES.items() if t.family == "decoder")
"""Plain decoders: ``diptych.core.spec.DecoderSpec``, built by each backend's ``model`` module."""

RECURRENT_MODEL_TYPES: tuple[str, ...] = tuple(n for n, t in MODEL_TYPES.items() if t.recurrent)
"""Recurrent-depth models: ``RecurrentSpec``, built by each backend's ``recurrent`` module."""


class UnknownModelType(ValueError):
    """A ``model_type`` that is not in :data:`MODEL_TYPES`."""


def supported_model_types() -> tuple[str, ...]:
    """Every model type diptych loads, in the order the docs list them."""
    return tuple(MODEL_TYPES)


def supported_text() -> str:
    """The supported types as error messages list them."""
    return ", ".join(MODEL_TYPES)


def get_model_type(name: Any) -> ModelType:
    """The table entry of ``name``, or a one-line error that lists every supported type."""
    if name not in MODEL_TYPES:
        raise UnknownModelType(f"Unknown model_type {name!r}; supported: {supported_text()}.")
    return MODEL_TYPES[name]


def model_type_of(spec_or_model: Any) -> str | None:
    """The ``model_type`` of a spec, or of a model / train state that carries one as ``.spec``."""
    spec = getattr(spec_or_model, "spec", spec_or_model)
    return getattr(spec, "model_type", None)


def is_recurrent(spec_or_model: Any) -> bool:
    """Whether a spec (or a model carrying ``.spec``) is a recurrent-depth model."""
    entry = MODEL_TYPES.get(model_type_of(spec_or_model))  # type: ignore[arg-type]
    return entry is not None and entry.recurrent
