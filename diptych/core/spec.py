"""Model specs: what a model is, independent of the framework that runs it.

A spec names every parameter with its Hugging Face name and shape and initialises all of
them in numpy from one seed, so the same seed gives bit-identical weights on JAX and torch
(DESIGN.md rule 4). Backends build their modules from a spec and a weight dict; nothing
else about a model's shape lives anywhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from diptych.core.model_types import DECODER_MODEL_TYPES, MODEL_TYPES, RECURRENT_MODEL_TYPES, supported_text
from diptych.core.rope import ignored_rope_keys, rope_parameters, standardized_rope_dict

SUPPORTED_MODEL_TYPES = DECODER_MODEL_TYPES
"""The model types :class:`DecoderSpec` builds (an alias of ``model_types.DECODER_MODEL_TYPES``)."""


class SpecError(ValueError):
    """A model config that diptych cannot build, with what was wrong and how to fix it."""


ROPE_TYPES_SUPPORTED = ("default", "linear", "dynamic", "llama3", "yarn")
"""The ``rope_type`` values the decoders apply (frequencies from ``diptych.core.rope``)."""

_CONSUMED_KEYS = frozenset({
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "intermediate_size", "rope_theta", "rope_parameters", "rope_scaling",
    "rms_norm_eps", "tie_word_embeddings", "attention_bias", "max_position_embeddings", "initializer_range",
    "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "mlp_bias", "use_sliding_window",
    "sliding_window", "max_window_layers", "layer_types", "no_rope_layers", "no_rope_layer_interval",
    "partial_rotary_factor", "original_max_position_embeddings",
})
"""config.json keys :meth:`DecoderSpec.from_hf_config` reads (or checks and refuses)."""

_INERT_KEYS = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache", "return_dict",
    "output_hidden_states", "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder", "id2label",
    "label2id", "problem_type", "tokenizer_class", "_name_or_path", "name_or_path", "auto_map",
    "pretraining_tp", "tf_legacy_loss", "use_bfloat16", "torchscript", "pruned_heads", "finetuning_task",
    "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params", "_attn_implementation_autoset",
    "attn_implementation",
})
"""config.json keys that do not change the model's function (metadata, runtime switches)."""

_INERT_AT = {"attention_dropout": 0.0}
"""Keys that are inert only at this value (diptych trains without attention dropout)."""


def _frozen(value: Any) -> Any:
    """Lists (and dicts) as tuples, so a spec holding a RoPE dict stays hashable."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


@dataclass(frozen=True)
class DecoderSpec:
    """A Llama-style decoder (pre-norm, RoPE, GQA, SwiGLU, RMSNorm): llama, qwen2, qwen3, mistral, smollm3.

    Field names follow Hugging Face ``config.json`` so a config round-trips unchanged; what differs
    between the families is read from their ``model_types`` entry. ``attention_bias`` adds q/k/v
    biases (and an ``o_proj`` bias where transformers does: not Qwen2); ``qk_norm`` adds the per-head
    RMSNorm on q and k (Qwen3). ``rope_parameters`` holds the standardized RoPE dict beyond the type
    and theta (``factor``, ``original_max_position_embeddings``, ...) as sorted ``(key, value)`` pairs
    so the spec stays hashable; ``sliding_window`` (Mistral) limits each query to the last that many
    keys; ``no_rope_layers`` (SmolLM3) has a 1 for each layer that applies RoPE.
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
    rope_type: str = "default"
    rope_parameters: Any = ()
    sliding_window: int | None = None
    no_rope_layers: tuple[int, ...] | None = None

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
        try:  # a dict, or (key, value) pairs as stored here or read back from JSON
            rope_fields = dict(self.rope_parameters or {})
        except (TypeError, ValueError):
            raise SpecError(f"rope_parameters must be a dict of RoPE fields, got {self.rope_parameters!r}.") from None
        object.__setattr__(self, "rope_parameters", _frozen(rope_fields))
        if self.rope_type not in ROPE_TYPES_SUPPORTED:
            raise SpecError(f"RoPE scaling type {self.rope_type!r} is not supported; diptych applies "
                            f"{', '.join(ROPE_TYPES_SUPPORTED)}. Fix rope_scaling / rope_parameters in config.json.")
        if self.sliding_window is not None:
            if not MODEL_TYPES[self.model_type].sliding_window:
                raise SpecError(f"sliding_window is set on a {self.model_type} spec; only "
                                f"{', '.join(n for n, t in MODEL_TYPES.items() if t.sliding_window)} use it.")
            if int(self.sliding_window) < 1:
                raise SpecError(f"sliding_window must be >= 1 (or null for full attention), got {self.sliding_window}.")
        if self.no_rope_layers is not None:
            object.__setattr__(self, "no_rope_layers", tuple(int(x) for x in self.no_rope_layers))
            if len(self.no_rope_layers) != self.num_hidden_layers or set(self.no_rope_layers) - {0, 1}:
                raise SpecError(f"no_rope_layers must hold one 0 or 1 per layer ({self.num_hidden_layers}), "
                                f"got {list(self.no_rope_layers)}.")
        self.rope()  # a RoPE dict that cannot give frequencies fails here, not inside a backend

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

    @property
    def o_bias(self) -> bool:
        """``o_proj`` has a bias: ``attention_bias`` on every family but Qwen2 (transformers' definition)."""
        return self.attention_bias and MODEL_TYPES[self.model_type].o_bias

    def layer_uses_rope(self, layer: int) -> bool:
        """SmolLM3 drops RoPE on the layers ``no_rope_layers`` marks 0; every other layer rotates."""
        return self.no_rope_layers is None or bool(self.no_rope_layers[layer])

    def rope_dict(self) -> dict[str, Any]:
        """The standardized RoPE dict (``rope_type``, ``rope_theta`` and the type's own fields)."""
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in self.rope_parameters}
        return {**fields, "rope_type": self.rope_type, "rope_theta": self.rope_theta}

    def rope(self) -> Any:
        """The layer's :class:`diptych.core.rope.RopeParams` (computed once per spec)."""
        cached = self.__dict__.get("_rope")
        if cached is None:
            try:
                cached = rope_parameters({"rope_parameters": self.rope_dict(), "head_dim": self.head_dim,
                                          "max_position_embeddings": self.max_position_embeddings})
            except (ValueError, TypeError) as e:
                raise SpecError(f"{self.model_type} RoPE: {e}") from None
            if cached.rotated_width != self.head_dim:
                raise SpecError(f"partial_rotary_factor below 1 is not supported (rotates {cached.rotated_width} "
                                f"of {self.head_dim} channels).")
            object.__setattr__(self, "_rope", cached)
        return cached

    def rope_inv_freq(self) -> tuple[float, ...]:
        """``rope().inv_freq`` as plain floats: a constant a tracer (``torch.compile``) folds in, where a
        numpy array would become a guarded input."""
        cached = self.__dict__.get("_rope_inv_freq")
        if cached is None:
            cached = tuple(float(x) for x in self.rope().inv_freq)
            object.__setattr__(self, "_rope_inv_freq", cached)
        return cached

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
            if self.o_bias:
                shapes[p + "self_attn.o_proj.bias"] = (h,)
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
        validate_weights(self.param_shapes(), weights, self.model_type, lambda names: _explain_unexpected(self, names))

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
        entry = MODEL_TYPES[model_type]
        try:
            rope = standardized_rope_dict(config, default_theta=entry.default_rope_theta)
        except (ValueError, TypeError) as e:
            raise SpecError(f"config.json RoPE: {e}") from None
        rope_type = rope.pop("rope_type")
        rope.pop("type", None)
        theta = rope.pop("rope_theta")
        prf = rope.pop("partial_rotary_factor", None)
        if prf not in (None, 1, 1.0):
            raise SpecError(f"partial_rotary_factor={prf} is not supported (diptych rotates whole heads).")
        if config.get("use_sliding_window"):
            raise SpecError(f"Sliding-window attention (use_sliding_window=true) is not supported for "
                            f"{model_type}; only {', '.join(n for n, t in MODEL_TYPES.items() if t.sliding_window)} "
                            "apply a sliding window.")
        partial = [t for t in (config.get("layer_types") or ()) if t != "full_attention"]
        if partial:
            raise SpecError(f"layer_types {sorted(set(partial))} are not supported; every layer must be "
                            "full_attention.")
        if config.get("hidden_act", "silu") != "silu":
            raise SpecError(f"hidden_act {config.get('hidden_act')!r} is not supported; only silu (SwiGLU) is.")
        if config.get("mlp_bias"):
            raise SpecError("mlp_bias=true is not supported.")
        known = {f.name for f in dataclasses.fields(cls)}
        skip = {"model_type", "rope_theta", "attention_bias", "qk_norm", "rope_type", "rope_parameters",
                "sliding_window", "no_rope_layers"}
        kwargs = {k: config[k] for k in known - skip if config.get(k) is not None}
        if config.get("num_key_value_heads") is None and "num_attention_heads" in config:
            kwargs["num_key_value_heads"] = config["num_attention_heads"]  # transformers' default: MHA
        bias = entry.qkv_bias if entry.qkv_bias is not None else bool(config.get("attention_bias", False))
        no_rope = None
        if entry.no_rope_layers:
            no_rope = config.get("no_rope_layers")
            if no_rope is None:  # SmolLM3Config's default: every interval-th layer skips RoPE
                interval = int(config.get("no_rope_layer_interval", 4))
                no_rope = [int((i + 1) % interval != 0) for i in range(int(config["num_hidden_layers"]))]
        return cls(
            model_type=model_type,
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_parameters=rope,
            attention_bias=bias,
            qk_norm=entry.qk_norm,
            sliding_window=config.get("sliding_window") if entry.sliding_window else None,
            no_rope_layers=no_rope,
            **kwargs,
        )

    @staticmethod
    def ignored_config_fields(config: dict[str, Any]) -> list[str]:
        """config.json fields :meth:`from_hf_config` neither reads nor knows to be inert, for parity's report.

        A field listed here may change what transformers computes while diptych never sees it
        (a new architecture switch, a quantization config), so the parity table names it.
        """
        out = [k for k in config if k not in _CONSUMED_KEYS and k not in _INERT_KEYS and k not in _INERT_AT]
        out += [f"{k}={config[k]!r}" for k, v in _INERT_AT.items() if k in config and config[k] not in (None, v)]
        with contextlib.suppress(ValueError, TypeError):
            out += [f"rope: {k}" for k in ignored_rope_keys(config)]
        return sorted(out)

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
            "rope_parameters": self.rope_dict(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        entry = MODEL_TYPES[self.model_type]
        if entry.qkv_bias is None:
            cfg["attention_bias"] = self.attention_bias
        elif self.attention_bias != entry.qkv_bias:
            raise SpecError(f"{self.model_type} always has attention_bias={entry.qkv_bias}; a {self.model_type} "
                            f"spec needs attention_bias={entry.qkv_bias}.")
        if entry.sliding_window:
            cfg["sliding_window"] = self.sliding_window
        if entry.no_rope_layers:
            cfg["no_rope_layers"] = list(self.no_rope_layers) if self.no_rope_layers is not None \
                else [1] * self.num_hidden_layers
            cfg["use_sliding_window"] = False
        return cfg


def _explain_unexpected(spec: DecoderSpec, names: list[str]) -> str:
    """Which config.json field would account for unexpected parameter names: usually the config, not
    the weights, is what disagrees, so say which field to check instead of sounding like corruption."""
    hints: list[str] = []
    layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.") and n.split(".")[2].isdigit()}
    if layers and max(layers) >= spec.num_hidden_layers:
        hints.append(f"num_hidden_layers={max(layers) + 1} (the config says {spec.num_hidden_layers})")
    if any(n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for n in names) or \
            (any(n.endswith("o_proj.bias") for n in names) and MODEL_TYPES[spec.model_type].o_bias):
        hints.append("attention_bias=true (transformers then puts a bias on q, k, v"
                     + (" and o" if MODEL_TYPES[spec.model_type].o_bias else "") + f" for {spec.model_type})")
    elif any(n.endswith("o_proj.bias") for n in names):
        hints.append(f"a model_type whose o_proj has a bias ({spec.model_type} never has one)")
    if any(n.endswith(("q_norm.weight", "k_norm.weight")) for n in names):
        hints.append("model_type qwen3 (per-head q/k norms)")
    if "lm_head.weight" in names:
        hints.append("tie_word_embeddings=false")
    if any(".mlp." in n and n.endswith(".bias") for n in names):
        hints.append("mlp_bias=true (which diptych does not support)")
    if not hints:
        return ""
    return f"; config.json would explain them with {' or '.join(hints)}: check it matches the weights"


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


def validate_weights(shapes: dict[str, tuple[int, ...]], weights: dict[str, np.ndarray], what: str,
                     explain: Callable[[list[str]], str] | None = None) -> None:
    """Fail with the parameter name and both shapes on any mismatch; name missing and unknown keys.

    ``explain`` turns the unexpected names into a hint about the config field that would account for them.
    """
    missing = [k for k in shapes if k not in weights]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise SpecError(f"Weights for {what} lack {', '.join(missing[:5])}{more}.")
    unknown = [k for k in weights if k not in shapes]
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        hint = explain(unknown) if explain is not None else ""
        raise SpecError(f"Weights for {what} have unexpected parameters {', '.join(unknown[:5])}{more}{hint}.")
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
    entry = MODEL_TYPES.get(model_type)
    base: dict[str, Any] = dict(
        model_type=model_type, vocab_size=128, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        attention_bias=bool(entry and entry.qkv_bias), qk_norm=bool(entry and entry.qk_norm),
        max_position_embeddings=512,
    )
    if entry is not None and entry.sliding_window:
        base["sliding_window"] = 8  # shorter than parity's longest row, so the window is exercised
    base.update(overrides)
    if entry is not None and entry.no_rope_layers and "no_rope_layers" not in overrides:
        base["no_rope_layers"] = [int((i + 1) % 2 != 0) for i in range(int(base["num_hidden_layers"]))]
        if "tie_word_embeddings" not in overrides:
            base["tie_word_embeddings"] = True
    return DecoderSpec(**base)
