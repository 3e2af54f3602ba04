"""Rotary position embeddings for every ``rope_type`` transformers knows, written once in numpy.

Each backend builds its cos/sin tables from :func:`rope_parameters` and :func:`rope_cos_sin`, and the
tests check those against transformers' ``ROPE_INIT_FUNCTIONS`` and ``LlamaRotaryEmbedding``, so a
Llama 3.1, YaRN, Qwen or Mistral checkpoint gets the frequencies it was trained with on both backends.

How a config is read follows ``transformers.modeling_rope_utils`` (5.x) exactly:

* the RoPE dict is ``rope_scaling`` (legacy) if it is set, else ``rope_parameters``; its type is
  ``rope_type``, else the legacy ``type``, else ``"default"``;
* ``rope_theta`` and ``partial_rotary_factor`` inside that dict win over top-level fields of the same name;
* for ``llama3``, ``yarn`` and ``longrope`` a top-level ``original_max_position_embeddings`` overrides the
  dict's (Phi-3 keeps it there), and without either it defaults to ``max_position_embeddings``.

Where transformers only logs a warning for a config that cannot be right (a factor below 1,
``high_freq_factor <= low_freq_factor``, ``beta_fast < beta_slow``, factor lists of the wrong length)
diptych raises, because training on silently wrong positions is worse than stopping.
Frequencies are computed in float64; transformers computes them in float32, so the two agree to
float32 rounding (about 1e-7 relative).

The Huginn recurrent spec rotates interleaved pairs and keeps its own code; everything here uses the
rotate-half layout of Llama, Qwen and Mistral.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_THETA = 10_000.0

# Keys each rope_type reads from the RoPE dict, as transformers' ``_validate_*_rope_parameters`` lists them
# (required | optional); ``rope_type``/``type`` and ``partial_rotary_factor`` are read for every type.
_USED_KEYS: dict[str, frozenset[str]] = {
    "default": frozenset({"rope_theta"}),
    "linear": frozenset({"rope_theta", "factor"}),
    "dynamic": frozenset({"rope_theta", "factor"}),
    "yarn": frozenset({"rope_theta", "factor", "original_max_position_embeddings", "attention_factor",
                       "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    "longrope": frozenset({"rope_theta", "short_factor", "long_factor", "original_max_position_embeddings",
                           "attention_factor", "factor"}),
    "llama3": frozenset({"rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor",
                         "high_freq_factor"}),
    "proportional": frozenset({"rope_theta", "factor"}),
}
_ALWAYS_USED = frozenset({"rope_type", "type", "partial_rotary_factor"})
_REQUIRED: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "proportional": (),
}
ROPE_TYPES: tuple[str, ...] = tuple(_USED_KEYS)
_NEEDS_ORIGINAL = ("llama3", "yarn", "longrope")


@dataclass(frozen=True)
class RopeParams:
    """The frequencies one attention layer rotates by, and what is needed to recompute them per length.

    ``inv_freq`` has ``rotary_dim // 2`` entries (rounded up, as transformers' ``arange(0, dim, 2)``);
    cos/sin are ``concat(freqs, freqs)`` so the rotated width is ``2 * len(inv_freq)``, and with a
    ``partial_rotary_factor`` below 1 the rest of each head passes through unrotated. ``dynamic`` is
    true for ``dynamic`` (NTK) and ``longrope``, whose frequencies depend on the current sequence
    length: use :func:`dynamic_inv_freq` (``rope_cos_sin`` does it for you).
    """

    inv_freq: np.ndarray
    attention_scaling: float
    rope_type: str
    dynamic: bool
    head_dim: int
    rotary_dim: int
    theta: float
    max_position_embeddings: int | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def rotated_width(self) -> int:
        """How many leading channels of a head cos/sin cover."""
        return 2 * int(self.inv_freq.shape[0])


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):  # a transformers PretrainedConfig, without importing transformers
        return dict(config.to_dict())
    kind = type(config).__name__
    raise TypeError(f"rope config must be a dict (a config.json) or a transformers config, got {kind}.")


def _raw_rope_dict(cfg: Mapping[str, Any], layer_type: str | None) -> dict[str, Any]:
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rope, Mapping):
        raise TypeError(f"rope_scaling / rope_parameters must be a dict, got {type(rope).__name__}: {rope!r}.")
    labels = set(cfg.get("layer_types") or ())
    nested = [k for k in rope if k in labels]
    if nested:
        if layer_type is None:
            raise ValueError(f"rope_parameters is given per layer type ({sorted(nested)}); pass layer_type= "
                             "to choose one.")
        rope = rope.get(layer_type)
        if rope is None:
            raise ValueError(f"rope_parameters has no entry for layer_type {layer_type!r} (has {sorted(nested)}).")
    return dict(rope)


def standardized_rope_dict(config: Any, layer_type: str | None = None,
                           default_theta: float = DEFAULT_THETA) -> dict[str, Any]:
    """The RoPE dict transformers' ``standardize_rope_params`` would leave on the config (a fresh copy).

    ``default_theta`` is the model class's ``default_theta`` (10000 for most; SmolLM3 2e6), used only
    when neither the RoPE dict nor the config has a ``rope_theta``.
    """
    cfg = _as_dict(config)
    rope = _raw_rope_dict(cfg, layer_type)
    rope.setdefault("rope_type", rope.get("type", "default"))
    if rope.get("rope_theta") is None:
        top = cfg.get("rope_theta")
        rope["rope_theta"] = float(top) if top is not None else float(default_theta)
    if rope.get("partial_rotary_factor") is None and cfg.get("partial_rotary_factor") is not None:
        rope["partial_rotary_factor"] = cfg["partial_rotary_factor"]
    if rope["rope_type"] in _NEEDS_ORIGINAL:
        if cfg.get("original_max_position_embeddings") is not None:
            rope["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        elif cfg.get("max_position_embeddings") is not None:
            rope.setdefault("original_max_position_embeddings", cfg["max_position_embeddings"])
    return rope


def ignored_rope_keys(config: Any, layer_type: str | None = None) -> list[str]:
    """RoPE fields in ``config`` that its ``rope_type`` never reads, for the parity report's "ignored" list.

    Reports keys of the RoPE dict outside the type's used set (e.g. ``factor`` on a ``default`` RoPE,
    ``mrope_section``), and ``rope_parameters`` itself when a legacy ``rope_scaling`` shadows a different one.
    """
    cfg = _as_dict(config)
    rope = _raw_rope_dict(cfg, layer_type)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    used = _USED_KEYS.get(rope_type)
    if used is None:
        _unknown_type(rope_type)
    ignored = sorted(k for k in rope if k not in used and k not in _ALWAYS_USED)
    scaling, params = cfg.get("rope_scaling"), cfg.get("rope_parameters")
    if scaling and params and dict(scaling) != dict(params):
        ignored.append("rope_parameters (shadowed by rope_scaling)")
    return ignored


def _unknown_type(rope_type: Any) -> None:
    raise ValueError(f"Unknown rope_type {rope_type!r}: diptych knows {', '.join(ROPE_TYPES)}. "
                     "Fix the config's rope_scaling / rope_parameters.")


def _number(rope: Mapping[str, Any], key: str, rope_type: str) -> float:
    value = rope.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"rope_type {rope_type!r} needs a number for {key!r}, got {value!r}.")
    return float(value)


def _check_factor(factor: float, rope_type: str) -> None:
    if not factor >= 1.0:
        raise ValueError(f"rope_type {rope_type!r} needs factor >= 1 (context length multiplier), got {factor}.")


def _resolve_head_dim(cfg: Mapping[str, Any], head_dim: int | None) -> int:
    if head_dim is None:
        head_dim = cfg.get("head_dim")
        if head_dim is None:
            hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
            if not hidden or not heads:
                raise ValueError("Pass head_dim, or a config with head_dim or hidden_size and num_attention_heads.")
            head_dim = hidden // heads
    if int(head_dim) != head_dim or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive integer, got {head_dim!r}.")
    return int(head_dim)


def _base_inv_freq(base: float, dim: int) -> np.ndarray:
    return 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def rope_parameters(config: Any, head_dim: int | None = None, *, layer_type: str | None = None,
                    default_theta: float = DEFAULT_THETA) -> RopeParams:
    """Frequencies and attention scaling for ``config`` (a config.json dict or a transformers config).

    ``head_dim`` defaults to the config's ``head_dim`` or ``hidden_size // num_attention_heads``.
    For ``dynamic`` and ``longrope`` the returned ``inv_freq`` is the one transformers builds at
    init (sequence length within the original context).
    """
    cfg = _as_dict(config)
    rope = standardized_rope_dict(cfg, layer_type, default_theta)
    rope_type = rope["rope_type"]
    if rope_type not in _USED_KEYS:
        _unknown_type(rope_type)
    missing = [k for k in _REQUIRED[rope_type] if k not in rope]
    if missing:
        raise ValueError(f"rope_type {rope_type!r} needs {missing} in rope_scaling / rope_parameters "
                         f"(got keys {sorted(rope)}).")
    hd = _resolve_head_dim(cfg, head_dim)
    base = _number(rope, "rope_theta", rope_type)
    if base <= 0:
        raise ValueError(f"rope_theta must be positive, got {base}.")
    prf = rope.get("partial_rotary_factor")
    prf = 1.0 if prf is None else _number(rope, "partial_rotary_factor", rope_type)
    if not 0.0 < prf <= 1.0:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {prf}.")
    dim = int(hd * prf)
    if dim < 2:
        raise ValueError(f"rotary dim int(head_dim * partial_rotary_factor) = {dim} is below 2.")
    max_pos = cfg.get("max_position_embeddings")

    common = dict(rope_type=rope_type, head_dim=hd, rotary_dim=dim, theta=base, fields=rope,
                  max_position_embeddings=max_pos)
    if rope_type == "default":
        return RopeParams(_base_inv_freq(base, dim), 1.0, dynamic=False, **common)
    if rope_type == "linear":
        factor = _number(rope, "factor", rope_type)
        _check_factor(factor, rope_type)
        return RopeParams(_base_inv_freq(base, dim) / factor, 1.0, dynamic=False, **common)
    if rope_type == "dynamic":
        _check_factor(_number(rope, "factor", rope_type), rope_type)
        if max_pos is None:
            raise ValueError("rope_type 'dynamic' needs max_position_embeddings in the config.")
        if dim <= 2:
            raise ValueError(f"rope_type 'dynamic' needs a rotary dim above 2 (exponent dim/(dim-2)), got {dim}.")
        return RopeParams(_base_inv_freq(base, dim), 1.0, dynamic=True, **common)
    if rope_type == "llama3":
        return RopeParams(_llama3_inv_freq(rope, base, dim), 1.0, dynamic=False, **common)
    if rope_type == "yarn":
        inv_freq, scaling = _yarn(rope, base, dim, max_pos)
        return RopeParams(inv_freq, scaling, dynamic=False, **common)
    if rope_type == "longrope":
        inv_freq, scaling = _longrope(rope, base, dim, max_pos, long=False)
        return RopeParams(inv_freq, scaling, dynamic=True, **common)
    # proportional (Gemma 4 style): the full head's table, zero frequency on the unrotated tail
    factor = float(rope.get("factor", 1.0))
    _check_factor(factor, rope_type)
    angles = int(prf * hd // 2)
    rotated = 1.0 / (base ** (np.arange(0, 2 * angles, 2, dtype=np.float64) / hd))
    inv_freq = np.concatenate([rotated, np.zeros(hd // 2 - angles)]) / factor
    return RopeParams(inv_freq, 1.0, dynamic=False, **{**common, "rotary_dim": hd})


def _llama3_inv_freq(rope: Mapping[str, Any], base: float, dim: int) -> np.ndarray:
    factor = _number(rope, "factor", "llama3")
    _check_factor(factor, "llama3")
    low = _number(rope, "low_freq_factor", "llama3")
    high = _number(rope, "high_freq_factor", "llama3")
    if not high > low:
        raise ValueError(f"rope_type 'llama3' needs high_freq_factor > low_freq_factor, got {high} and {low}.")
    old_context = _number(rope, "original_max_position_embeddings", "llama3")
    inv_freq = _base_inv_freq(base, dim)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_context / low, old_context / high
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled)


def _yarn(rope: Mapping[str, Any], base: float, dim: int, max_pos: int | None) -> tuple[np.ndarray, float]:
    original = _number(rope, "original_max_position_embeddings", "yarn")
    factor = rope.get("factor")
    if factor is None:  # DeepSeek-V3 style: the factor is the ratio of the two context lengths
        if max_pos is None:
            raise ValueError("rope_type 'yarn' with factor None needs max_position_embeddings to derive it.")
        factor = max_pos / original
    else:
        factor = _number(rope, "factor", "yarn")
        _check_factor(factor, "yarn")

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    elif float(attention_factor) < 0:
        raise ValueError(f"rope_type 'yarn' needs attention_factor >= 0, got {attention_factor}.")
    beta_fast = rope.get("beta_fast") or 32  # transformers' `or`: 0 and None both mean the default
    beta_slow = rope.get("beta_slow") or 1
    if beta_fast < beta_slow:
        raise ValueError(f"rope_type 'yarn' needs beta_fast >= beta_slow, got {beta_fast} and {beta_slow}.")
    truncate = rope.get("truncate", True)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # share of each frequency kept unscaled
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _longrope(rope: Mapping[str, Any], base: float, dim: int, max_pos: int | None,
              long: bool) -> tuple[np.ndarray, float]:
    original = _number(rope, "original_max_position_embeddings", "longrope")
    factor = rope.get("factor")
    if factor is None:  # Phi-3: the ratio of the extended and original context lengths
        if max_pos is None:
            raise ValueError("rope_type 'longrope' without factor needs max_position_embeddings to derive it.")
        factor = max_pos / original
    factor = float(factor)
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    n = len(range(0, dim, 2))
    for key in ("short_factor", "long_factor"):
        values = rope[key]
        if not isinstance(values, (list, tuple)) or len(values) != n:
            raise ValueError(f"rope_type 'longrope' needs {key} as a list of {n} numbers (rotary dim {dim} / 2), "
                             f"got {values!r}.")
    ext = np.asarray(rope["long_factor" if long else "short_factor"], dtype=np.float64)
    return 1.0 / (ext * base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)), float(attention_factor)


def dynamic_inv_freq(params: RopeParams, seq_len: int) -> np.ndarray:
    """``inv_freq`` for a forward pass whose positions reach ``seq_len - 1``.

    ``dynamic`` (NTK) raises the base to ``theta * (factor * L / max_pos - (factor - 1)) ** (d / (d - 2))``
    with ``L = max(seq_len, max_position_embeddings)``; ``longrope`` switches from ``short_factor`` to
    ``long_factor`` once ``seq_len`` exceeds the original context. Other types return ``params.inv_freq``.
    transformers' module keeps the largest length seen so far until a short batch resets it; this
    stateless function equals a fresh module called with positions ``< seq_len``.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}.")
    if params.rope_type == "dynamic":
        rope, dim, max_pos = params.fields, params.rotary_dim, int(params.max_position_embeddings)
        factor = float(rope["factor"])
        length = max(int(seq_len), max_pos)
        base = params.theta * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim)
    if params.rope_type == "longrope":
        original = params.fields["original_max_position_embeddings"]
        return _longrope(params.fields, params.theta, params.rotary_dim, params.max_position_embeddings,
                         long=int(seq_len) > original)[0]
    return params.inv_freq


def rope_cos_sin(params: RopeParams, positions: Any, seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables, shape ``positions.shape + (rotated_width,)``, already times ``attention_scaling``.

    For the length-dependent types the frequencies follow ``seq_len``, by default ``max(positions) + 1``
    as in transformers' ``dynamic_rope_update``.
    """
    pos = np.asarray(positions)
    if not np.issubdtype(pos.dtype, np.integer) and not np.issubdtype(pos.dtype, np.floating):
        raise TypeError(f"positions must be numeric, got dtype {pos.dtype}.")
    inv_freq = params.inv_freq
    if params.dynamic:
        inv_freq = dynamic_inv_freq(params, int(pos.max()) + 1 if seq_len is None else seq_len)
    freqs = pos.astype(np.float64)[..., None] * inv_freq
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb) * params.attention_scaling, np.sin(emb) * params.attention_scaling


def rotate_half(x: np.ndarray) -> np.ndarray:
    """``concat(-x2, x1)`` for the two halves of the last axis: the Llama/Qwen/Mistral pairing."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: Any, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """``x * cos + rotate_half(x) * sin`` on the first ``cos.shape[-1]`` channels; the rest pass through.

    ``cos``/``sin`` must broadcast against ``x[..., :width]`` (e.g. ``[seq, width]`` against
    ``[batch, heads, seq, head_dim]``); the pass-through tail is how partial rotary models (Phi, GLM) apply it.
    """
    x = np.asarray(x)
    width = cos.shape[-1]
    if width > x.shape[-1] or width % 2:
        raise ValueError(f"cos/sin width {width} must be even and at most the head size {x.shape[-1]}.")
    rot, rest = x[..., :width], x[..., width:]
    out = rot * cos + rotate_half(rot) * sin
    return np.concatenate([out, rest], axis=-1) if rest.shape[-1] else out
