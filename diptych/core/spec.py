"""Model specs: what a model is, independent of the framework that runs it.

A spec names every parameter with its Hugging Face name and shape and initialises all of
them in numpy from one seed, so the same seed gives bit-identical weights on JAX and torch
(DESIGN.md rule 4). Backends build their modules from a spec and a weight dict; nothing
else about a model's shape lives anywhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from diptych.core.model_types import DECODER_MODEL_TYPES, MODEL_TYPES, RECURRENT_MODEL_TYPES, supported_text

SUPPORTED_MODEL_TYPES = DECODER_MODEL_TYPES
"""The model types :class:`DecoderSpec` builds (an alias of ``model_types.DECODER_MODEL_TYPES``)."""


class SpecError(ValueError):
    """A model config that diptych cannot build, with what was wrong and how to fix it."""


@dataclass(frozen=True)
class DecoderSpec:
    """A Llama / Qwen2 / Qwen3 family decoder (pre-norm, RoPE, GQA, SwiGLU, RMSNorm).

    Field names follow Hugging Face ``config.json`` so a config round-trips unchanged.
    ``attention_bias`` adds q/k/v biases (Qwen2 always has them); ``qk_norm`` adds the
    per-head RMSNorm on q and k (Qwen3).
    """

    model_type: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    intermediate_size: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            hint = (" (a recurrent-depth type: build it with diptych.core.recurrent_spec.RecurrentSpec)"
                    if self.model_type in RECURRENT_MODEL_TYPES else "")
            raise SpecError(
                f"Unsupported model_type {self.model_type!r} for DecoderSpec{hint}; DecoderSpec builds "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}, and diptych supports {supported_text()}."
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size"):
            if int(getattr(self, name)) < 1:
                raise SpecError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise SpecError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention."
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise SpecError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim explicitly."
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim % 2:
            raise SpecError(f"head_dim must be even for rotary embeddings, got {self.head_dim}.")

    # -- derived ------------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return eos_tuple(self.eos_token_id)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's Hugging Face name and shape, in a fixed order (the init order)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
        for layer in range(self.num_hidden_layers):
            p = f"model.layers.{layer}."
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "self_attn.q_proj.weight"] = (self.q_dim, h)
            shapes[p + "self_attn.k_proj.weight"] = (self.kv_dim, h)
            shapes[p + "self_attn.v_proj.weight"] = (self.kv_dim, h)
            if self.attention_bias:
                shapes[p + "self_attn.q_proj.bias"] = (self.q_dim,)
                shapes[p + "self_attn.k_proj.bias"] = (self.kv_dim,)
                shapes[p + "self_attn.v_proj.bias"] = (self.kv_dim,)
            shapes[p + "self_attn.o_proj.weight"] = (h, self.q_dim)
            if self.qk_norm:
                shapes[p + "self_attn.q_norm.weight"] = (self.head_dim,)
                shapes[p + "self_attn.k_norm.weight"] = (self.head_dim,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            shapes[p + "mlp.gate_proj.weight"] = (i, h)
            shapes[p + "mlp.up_proj.weight"] = (i, h)
            shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (v, h)
        return shapes

    def num_params(self) -> int:
        return count_params(self.param_shapes())

    def init_weights(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Float32 weights from one numpy stream: normals for matrices, ones for norms, zeros for biases."""
        return init_from_shapes(self.param_shapes(), seed, self.initializer_range)

    def validate_weights(self, weights: dict[str, np.ndarray]) -> None:
        validate_weights(self.param_shapes(), weights, self.model_type)

    # -- Hugging Face config ------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> DecoderSpec:
        """Build a spec from a ``config.json`` dict (transformers 4.x or 5.x layout)."""
        model_type = config.get("model_type")
        if model_type is None:
            raise SpecError(f"config.json has no 'model_type'; expected one of {supported_text()}.")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise SpecError(
                f"Unsupported model_type {model_type!r} in config.json for DecoderSpec; supported: "
                f"{supported_text()} (load a folder with diptych.core.hf.load_hf_folder to dispatch on it)."
            )
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
        if rope_type not in ("default", None):
            raise SpecError(f"RoPE scaling type {rope_type!r} is not supported yet; only default RoPE is.")
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        if config.get("use_sliding_window"):
            raise SpecError("Sliding-window attention (use_sliding_window=true) is not supported.")
        if config.get("hidden_act", "silu") != "silu":
            raise SpecError(f"hidden_act {config.get('hidden_act')!r} is not supported; only silu (SwiGLU) is.")
        if config.get("mlp_bias"):
            raise SpecError("mlp_bias=true is not supported.")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: config[k] for k in known if k in config and k != "model_type"}
        kwargs.pop("rope_theta", None)
        kwargs.pop("attention_bias", None)
        return cls(
            model_type=model_type,
            rope_theta=float(theta),
            attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            **kwargs,
        )

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers.AutoConfig`` reads back to the same model."""
        cfg: dict[str, Any] = {
            "architectures": [MODEL_TYPES[self.model_type].architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        if self.model_type != "qwen2":
            cfg["attention_bias"] = self.attention_bias
        elif not self.attention_bias:
            raise SpecError("Qwen2 always has q/k/v biases; a qwen2 spec needs attention_bias=True.")
        return cfg


def eos_tuple(eos_token_id: int | list[int] | tuple[int, ...] | None) -> tuple[int, ...]:
    """A config's ``eos_token_id`` (None, one id or a list, as HF writes it) as a tuple of ids."""
    if eos_token_id is None:
        return ()
    return tuple(int(e) for e in eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (int(eos_token_id),)


def count_params(shapes: dict[str, tuple[int, ...]]) -> int:
    """The number of scalars in a spec's parameters."""
    return int(sum(np.prod(s) for s in shapes.values()))


def init_from_shapes(shapes: dict[str, tuple[int, ...]], seed: int, std: float) -> dict[str, np.ndarray]:
    """Deterministic float32 init shared by every spec: draw order is the order of ``shapes``."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if name.endswith(".bias"):
            out[name] = np.zeros(shape, np.float32)
        elif len(shape) == 1 or "norm" in name.rsplit(".", 2)[-2] or name.endswith("ln_f.weight"):
            out[name] = np.ones(shape, np.float32)
        else:
            out[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)
    return out


def validate_weights(shapes: dict[str, tuple[int, ...]], weights: dict[str, np.ndarray], what: str) -> None:
    """Fail with the parameter name and both shapes on any mismatch; name missing and unknown keys."""
    missing = [k for k in shapes if k not in weights]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise SpecError(f"Weights for {what} lack {', '.join(missing[:5])}{more}.")
    unknown = [k for k in weights if k not in shapes]
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise SpecError(f"Weights for {what} have unexpected parameters {', '.join(unknown[:5])}{more}.")
    for name, shape in shapes.items():
        got = tuple(np.shape(weights[name]))
        if got != tuple(shape):
            raise SpecError(f"Parameter {name}: checkpoint has shape {got}, the model config expects {tuple(shape)}.")


def value_head_init(spec: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """PPO's scalar value head ``(weight [1, H], bias [1])`` in float32, drawn here so both backends
    start from the same head (recurrent specs carry no ``initializer_range``: 0.02 then)."""
    rng = np.random.default_rng(seed)
    scale = np.float32(getattr(spec, "initializer_range", None) or 0.02)
    w = rng.standard_normal((1, spec.hidden_size), dtype=np.float32) * scale
    return w.astype(np.float32), np.zeros((1,), np.float32)


def tiny_spec(model_type: str = "llama", **overrides: Any) -> DecoderSpec:
    """The embedded tiny model used by tests, `diptych parity` and the quickstart."""
    base: dict[str, Any] = dict(
        model_type=model_type, vocab_size=128, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        attention_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
        max_position_embeddings=512,
    )
    base.update(overrides)
    return DecoderSpec(**base)
