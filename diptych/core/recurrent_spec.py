"""The recurrent-depth (Huginn / "raven") model spec: names, shapes, numpy init, config.json.

A recurrent-depth model is prelude -> core block applied r times -> coda. Parameter names and
config field names follow the published Huginn-0125 checkpoint (``model_type: huginn_raven``)
so its folders load unchanged; shapes and the initial-state noise live here, in numpy, so the
same seed gives the same weights and the same latent start on both backends (DESIGN.md rules
4 and 5).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diptych.core.model_types import HUGINN, MODEL_TYPES
from diptych.core.spec import SpecError, count_params, eos_tuple, validate_weights

MODEL_TYPE = HUGINN


@dataclass(frozen=True)
class RecurrentSpec:
    """Huginn's architecture with Huginn's ``config.json`` field names.

    ``init_values`` holds Huginn's init constants (``std``, ``embedding``, ``out_proj``,
    ``embed_scale``); missing ones are derived with its "takase" scheme from ``n_embd`` and the
    expected depth. ``vocab_size`` is the tokenizer's size; every shape uses ``padded_vocab_size``.
    """

    n_embd: int = 64
    n_heads: int = 4
    num_key_value_heads: int | None = None
    intermediate_size: int = 128
    vocab_size: int = 128
    padded_vocab_size: int | None = None
    n_layers_in_prelude: int = 2
    n_layers_in_recurrent_block: int = 4
    n_layers_in_coda: int = 2
    mean_recurrence: int = 32
    mean_backprop_depth: int = 8
    norm_eps: float = 1e-6
    rope_base: float = 50000.0
    block_size: int = 4096
    qk_bias: bool = True
    bias: bool = False
    tie_embeddings: bool = True
    init_values: dict[str, float] = field(default_factory=dict, hash=False)
    """Compared (``embed_scale`` is read at JAX trace time, so specs differing in it must not share a compile) but
    not hashed (a dict is not hashable; equal specs still hash equal)."""
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    model_type = MODEL_TYPE

    def __post_init__(self) -> None:
        for name in ("n_embd", "n_heads", "intermediate_size", "vocab_size", "n_layers_in_recurrent_block"):
            if int(getattr(self, name)) < 1:
                raise SpecError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("n_layers_in_prelude", "n_layers_in_coda"):
            if int(getattr(self, name)) < 0:
                raise SpecError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.mean_recurrence < 1:
            raise SpecError(f"mean_recurrence must be >= 1, got {self.mean_recurrence}.")
        if self.mean_backprop_depth < 1:
            raise SpecError(
                f"mean_backprop_depth must be >= 1, got {self.mean_backprop_depth}: at least one "
                "iteration has to carry gradient."
            )
        if self.n_embd % self.n_heads:
            raise SpecError(f"n_embd ({self.n_embd}) must be divisible by n_heads ({self.n_heads}).")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.n_heads)
        if self.n_heads % self.num_key_value_heads:
            raise SpecError(
                f"n_heads ({self.n_heads}) must be a multiple of num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.qk_bias and self.num_key_value_heads != self.n_heads:
            raise SpecError("qk_bias has one bias per query head for q and k, so it needs num_key_value_heads == "
                            "n_heads (as in Huginn); set qk_bias=false or use as many kv heads as heads.")
        if self.head_dim % 2:
            raise SpecError(f"head_dim (n_embd / n_heads = {self.head_dim}) must be even for rotary embeddings.")
        if self.padded_vocab_size is None:
            object.__setattr__(self, "padded_vocab_size", self.vocab_size)
        if self.padded_vocab_size < self.vocab_size:
            raise SpecError(f"padded_vocab_size ({self.padded_vocab_size}) < vocab_size ({self.vocab_size}).")
        std = self.init_values.get("std", math.sqrt(2.0 / (5.0 * self.n_embd)))
        defaults = {
            "std": std,
            "embedding": std,
            "out_proj": std / math.sqrt(2.0 * self.effective_expected_depth),
            "embed_scale": math.sqrt(self.n_embd),
        }
        object.__setattr__(self, "init_values", {**defaults, **dict(self.init_values)})

    # -- derived (HF-style aliases so generic code can read any spec) ---------------------
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_heads

    @property
    def tie_word_embeddings(self) -> bool:
        return self.tie_embeddings

    @property
    def embed_scale(self) -> float:
        return float(self.init_values["embed_scale"])

    @property
    def effective_expected_depth(self) -> int:
        core = self.n_layers_in_recurrent_block * self.mean_recurrence
        return self.n_layers_in_prelude + self.n_layers_in_coda + core

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return eos_tuple(self.eos_token_id)

    def layer_prefixes(self) -> list[str]:
        """Every sandwich block's name prefix, in data-flow order (prelude, core block, coda)."""
        return ([f"transformer.prelude.{i}." for i in range(self.n_layers_in_prelude)]
                + [f"transformer.core_block.{i}." for i in range(self.n_layers_in_recurrent_block)]
                + [f"transformer.coda.{i}." for i in range(self.n_layers_in_coda)])

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's Huginn name and shape, in a fixed order (the init order)."""
        h, i, v = self.n_embd, self.intermediate_size, self.padded_vocab_size
        hd, nh, nkv = self.head_dim, self.n_heads, self.num_key_value_heads
        shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (v, h)}
        blocks = self.layer_prefixes()
        n_pre = self.n_layers_in_prelude
        for idx, p in enumerate(blocks):
            if idx == n_pre:
                shapes["transformer.adapter.weight"] = (h, 2 * h)
                if self.bias:
                    shapes["transformer.adapter.bias"] = (h,)
            shapes[p + "norm_1.weight"] = (h,)
            shapes[p + "attn.Wqkv.weight"] = ((nh + 2 * nkv) * hd, h)
            if self.qk_bias:
                shapes[p + "attn.qk_bias"] = (2, 1, nh, hd)
            shapes[p + "attn.proj.weight"] = (h, h)
            shapes[p + "norm_2.weight"] = (h,)
            shapes[p + "mlp.fc.weight"] = (2 * i, h)
            shapes[p + "mlp.proj.weight"] = (h, i)
            shapes[p + "norm_3.weight"] = (h,)
            shapes[p + "norm_4.weight"] = (h,)
        shapes["transformer.ln_f.weight"] = (h,)
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (v, h)
        return shapes

    def num_params(self) -> int:
        return count_params(self.param_shapes())

    def init_weights(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Huginn's "takase" init in numpy: small normals, scaled-down output projections, unit norms."""
        rng = np.random.default_rng(seed)
        iv = self.init_values
        out: dict[str, np.ndarray] = {}
        for name, shape in self.param_shapes().items():
            leaf = name.rsplit(".", 2)
            if name.endswith(".bias") or name.endswith("qk_bias"):
                out[name] = np.zeros(shape, np.float32)
                continue
            if "norm" in leaf[-2] or name.startswith("transformer.ln_f"):
                out[name] = np.ones(shape, np.float32)
                continue
            if name.startswith("transformer.wte") or name == "lm_head.weight":
                std = iv["embedding"]
            elif name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                std = iv["out_proj"]
            else:
                std = iv["std"]
            out[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)
        return out

    def validate_weights(self, weights: dict[str, np.ndarray]) -> None:
        validate_weights(self.param_shapes(), weights, MODEL_TYPE)

    # -- Huginn config.json -----------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> RecurrentSpec:
        """Build a spec from a Huginn ``config.json`` dict (also accepts HF-style aliases)."""
        if config.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise SpecError(f"RecurrentSpec reads model_type {MODEL_TYPE!r}, got {config.get('model_type')!r}.")
        cfg = dict(config)
        for alias, name in (("hidden_size", "n_embd"), ("num_attention_heads", "n_heads")):
            if alias in cfg and name not in cfg:
                cfg[name] = cfg[alias]
        if "tie_embeddings" not in cfg and "tie_word_embeddings" in cfg:
            cfg["tie_embeddings"] = cfg["tie_word_embeddings"]
        if cfg.get("injection_type", "linear") != "linear":
            raise SpecError(f"injection_type {cfg['injection_type']!r} is not supported; only 'linear' (Huginn's).")
        if cfg.get("mlp_class_name", "GatedMLP") != "GatedMLP":
            raise SpecError(f"mlp_class_name {cfg['mlp_class_name']!r} is not supported; only GatedMLP.")
        if cfg.get("nonlin_name", "SiLU") != "SiLU":
            raise SpecError(f"nonlin_name {cfg['nonlin_name']!r} is not supported; only SiLU.")
        if float(cfg.get("test_time_noise", 0) or 0) != 0:
            raise SpecError("test_time_noise > 0 is not supported; set it to 0.")
        hd = cfg.get("head_dim")
        if hd is not None and "n_embd" in cfg and "n_heads" in cfg and hd != cfg["n_embd"] // cfg["n_heads"]:
            # Huginn's reference code never reads config.head_dim (it uses n_embd // n_heads), so a
            # stale value there does not change the model: derive it as the reference does, and say so.
            warnings.warn(f"config.json head_dim {hd} != n_embd / n_heads = {cfg['n_embd'] // cfg['n_heads']}; "
                          "Huginn's reference code ignores head_dim, so diptych derives it from n_embd and n_heads.",
                          stacklevel=2)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: cfg[k] for k in known if k in cfg}
        kwargs["init_values"] = dict(cfg.get("init_values") or {})
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        """A Huginn-0125-shaped ``config.json`` dict."""
        return {
            "architectures": [MODEL_TYPES[MODEL_TYPE].architecture],
            "model_type": MODEL_TYPE,
            "bias": self.bias,
            "block_size": self.block_size,
            "effective_expected_depth": self.effective_expected_depth,
            "head_dim": self.head_dim,
            "init_strategy": "takase",
            "init_values": dict(self.init_values),
            "injection_type": "linear",
            "intermediate_size": self.intermediate_size,
            "mean_backprop_depth": self.mean_backprop_depth,
            "mean_recurrence": self.mean_recurrence,
            "mlp_class_name": "GatedMLP",
            "n_embd": self.n_embd,
            "n_heads": self.n_heads,
            "n_layers": self.n_layers_in_prelude + self.n_layers_in_recurrent_block + self.n_layers_in_coda,
            "n_layers_in_coda": self.n_layers_in_coda,
            "n_layers_in_prelude": self.n_layers_in_prelude,
            "n_layers_in_recurrent_block": self.n_layers_in_recurrent_block,
            "nonlin_name": "SiLU",
            "norm_class_name": "RMSNorm_llama",
            "norm_eps": self.norm_eps,
            "num_key_value_heads": self.num_key_value_heads,
            "padded_vocab_size": self.padded_vocab_size,
            "qk_bias": self.qk_bias,
            "rope_base": self.rope_base,
            "sampling_scheme": "poisson-lognormal-filling",
            "state_init": "like-init",
            "test_time_noise": 0,
            "test_time_noise_type": "fixed",
            "tie_embeddings": self.tie_embeddings,
            "tie_word_embeddings": self.tie_embeddings,
            "vocab_size": self.vocab_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }


def initial_state_noise(spec: RecurrentSpec, shape: tuple[int, ...], rng: np.random.Generator,
                        scale: float = 1.0) -> np.ndarray:
    """Huginn's random latent start s0: truncated normal (cut at 3 std) times the embedding scale.

    ``scale=0`` gives zeros (Huginn's deterministic ``init_scale=0``). Drawn in numpy so both
    backends start from the same state in parity mode.
    """
    std = float(spec.init_values["std"]) * float(scale)
    if std <= 0:
        return np.zeros(shape, np.float32)
    z = rng.standard_normal(shape)
    bad = np.abs(z) > 3.0
    while bad.any():
        z[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(z) > 3.0
    return (z * std * spec.embed_scale).astype(np.float32)


def tiny_recurrent_spec(**overrides: Any) -> RecurrentSpec:
    """The embedded tiny recurrent model used by tests, `diptych parity` and the recipe."""
    base: dict[str, Any] = dict(
        n_embd=64, n_heads=4, intermediate_size=128, vocab_size=128, n_layers_in_prelude=1,
        n_layers_in_recurrent_block=2, n_layers_in_coda=1, mean_recurrence=8, mean_backprop_depth=4,
        block_size=512,
    )
    base.update(overrides)
    return RecurrentSpec(**base)

