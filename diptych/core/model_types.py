"""The one table of model types: which ``config.json`` ``model_type`` values diptych knows, and
which of them are recurrent-depth models. Everything that dispatches on a model type reads it
here (the backends' facade, HF folder loading, parity, the CLI), so adding a family is one entry.

This module imports nothing from diptych, so any module may import it without a cycle.
"""

from __future__ import annotations

from typing import Any

DECODER_MODEL_TYPES: tuple[str, ...] = ("llama", "qwen2", "qwen3")
"""Plain decoders: ``diptych.core.spec.DecoderSpec``, built by each backend's ``model`` module."""

HUGINN = "huginn_raven"
RECURRENT_MODEL_TYPES: tuple[str, ...] = (HUGINN,)
"""Recurrent-depth models: ``RecurrentSpec``, built by each backend's ``recurrent`` module."""


def model_type_of(spec_or_model: Any) -> str | None:
    """The ``model_type`` of a spec, or of a model / train state that carries one as ``.spec``."""
    spec = getattr(spec_or_model, "spec", spec_or_model)
    return getattr(spec, "model_type", None)


def is_recurrent(spec_or_model: Any) -> bool:
    """Whether a spec (or a model carrying ``.spec``) is a recurrent-depth model."""
    return model_type_of(spec_or_model) in RECURRENT_MODEL_TYPES


def supported_model_types() -> tuple[str, ...]:
    """Every model type diptych loads, in the order the docs list them."""
    return DECODER_MODEL_TYPES + RECURRENT_MODEL_TYPES
