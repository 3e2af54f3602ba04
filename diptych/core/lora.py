"""LoRA / QLoRA configuration: the ``lora:`` block of every trainer config.

Backend-neutral (no framework import). The adapter math, the canonical adapter form (PEFT's names and
``adapter_config.json``) and the numpy initialisation live here too; each backend applies adapters to its own
linear layers (``diptych.backends.{jax,torch}.lora``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The attention and MLP projections of the decoder families (PEFT's ``all-linear`` minus the head)."""
RECURRENT_TARGETS: tuple[str, ...] = ("attn.Wqkv", "attn.proj", "mlp.fc", "mlp.proj")
"""The same for a recurrent-depth (Huginn) model: fused qkv, attention output, fused gate/up, down (not the
recurrence's input adapter); used when the default targets match none of its layers."""


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


# -- which modules get adapters -------------------------------------------------------------------
_PLAIN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def _matches(pattern: str, name: str) -> bool:
    """PEFT's rule: a plain (dotted) name matches a module whose name is it or ends in ``.{pattern}``; anything
    else is a regex that must match the full module name (``re.fullmatch``)."""
    if _PLAIN.fullmatch(pattern):
        return name == pattern or name.endswith("." + pattern)
    return re.fullmatch(pattern, name) is not None


def match_targets(module_names: Iterable[str], cfg: LoRAConfig) -> list[str]:
    """The module names (in the given order) that ``cfg.targets`` selects; a pattern matching nothing is an error,
    since a typo there would otherwise silently train fewer layers than asked."""
    names = list(module_names)
    for pattern in cfg.targets:
        if not _PLAIN.fullmatch(pattern):
            try:
                re.compile(pattern)
            except re.error as e:
                raise LoRAError(f"lora.targets pattern {pattern!r} is not a valid regex ({e}).") from None
    unmatched = [p for p in cfg.targets if not any(_matches(p, n) for n in names)]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise LoRAError(f"lora.targets {unmatched} match no linear layer of this model; its linear layers end in "
                        f"{leaves} (e.g. {names[:3]}). Set lora.targets to some of those.")
    return [n for n in names if any(_matches(p, n) for p in cfg.targets)]


def resolve_targets(module_names: Iterable[str], cfg: LoRAConfig, *, recurrent: bool = False,
                    ) -> tuple[LoRAConfig, list[str]]:
    """``(cfg with its effective targets, matched module names)``. The default targets name decoder layers; on a
    recurrent-depth model, where none of them exist, they mean its attention and MLP projections instead."""
    names = list(module_names)
    if recurrent and tuple(cfg.targets) == DEFAULT_TARGETS and not any(
            _matches(p, n) for p in cfg.targets for n in names):
        cfg = replace(cfg, targets=RECURRENT_TARGETS)
    return cfg, match_targets(names, cfg)


# -- the canonical adapter form ------------------------------------------------------------------
def adapter_names(module: str) -> tuple[str, str]:
    """``({module}.lora_A.weight, {module}.lora_B.weight)``: PEFT's names without its ``base_model.model.`` prefix."""
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def adapter_modules(adapters: Mapping[str, Any]) -> list[str]:
    """The module names an adapter dict covers, sorted; an A without its B (or a stray key) is an error."""
    modules = sorted({k[: -len(".lora_A.weight")] for k in adapters if k.endswith(".lora_A.weight")})
    expected = {n for m in modules for n in adapter_names(m)}
    stray = sorted(set(adapters) - expected)
    missing = sorted(expected - set(adapters))
    if stray or missing:
        raise LoRAError(f"Not a LoRA adapter dict: unexpected keys {stray[:4]}, missing {missing[:4]}; each module "
                        "needs both '{module}.lora_A.weight' [r, in] and '{module}.lora_B.weight' [out, r].")
    return modules


def check_rank(shapes: Mapping[str, tuple[int, int]], cfg: LoRAConfig) -> None:
    """A rank above ``min(in, out)`` adds parameters without adding expressiveness: refuse it by layer."""
    too_big = {m: s for m, s in shapes.items() if cfg.r > min(s)}
    if too_big:
        m, (out, inp) = next(iter(too_big.items()))
        raise LoRAError(f"lora.r={cfg.r} exceeds min(in, out)={min(out, inp)} of {m} ([{out}, {inp}]) and "
                        f"{len(too_big) - 1} other layers; use lora.r <= {min(min(s) for s in too_big.values())} "
                        "or drop those layers from lora.targets.")


def init_adapters(shapes: Mapping[str, tuple[int, int]], cfg: LoRAConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh adapters in numpy, so both backends start bit-identical: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's
    ``kaiming_uniform_(a=sqrt(5))``), B = 0, so the adapted model starts equal to the base.

    Each module draws from its own stream seeded by ``(seed, crc32(name))``: a module's A does not depend on
    which other modules are targeted.
    """
    check_rank(shapes, cfg)
    out: dict[str, np.ndarray] = {}
    for module, (n_out, n_in) in shapes.items():
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(module.encode())]))
        bound = 1.0 / math.sqrt(n_in)
        a_name, b_name = adapter_names(module)
        out[a_name] = rng.uniform(-bound, bound, size=(cfg.r, n_in)).astype(np.float32)
        out[b_name] = np.zeros((n_out, cfg.r), np.float32)
    return out


def check_adapters(adapters: Mapping[str, Any], shapes: Mapping[str, tuple[int, int]], cfg: LoRAConfig) -> None:
    """Adapters fit a model's targeted layers: the same modules, ``A [r, in]``, ``B [out, r]``."""
    modules = adapter_modules(adapters)
    if set(modules) != set(shapes):
        raise LoRAError(f"The adapters cover modules {sorted(set(modules) - set(shapes))[:3]} the model has no "
                        f"adapter on and miss {sorted(set(shapes) - set(modules))[:3]}; apply LoRA with the "
                        "adapters' own targets (load_adapter returns its LoRAConfig).")
    for m, (n_out, n_in) in shapes.items():
        a_name, b_name = adapter_names(m)
        a, b = tuple(np.shape(adapters[a_name])), tuple(np.shape(adapters[b_name]))
        if a != (cfg.r, n_in) or b != (n_out, cfg.r):
            raise LoRAError(f"Adapter of {m} has A {a} and B {b}; this model (r={cfg.r}) needs A {(cfg.r, n_in)} "
                            f"and B {(n_out, cfg.r)}.")


def merge_weights(weights: Mapping[str, np.ndarray], adapters: Mapping[str, np.ndarray],
                  cfg: LoRAConfig) -> dict[str, np.ndarray]:
    """Canonical weights with every adapter folded in, ``W + scaling * B @ A`` (float32, PEFT's order): what an
    HF export or a merged-weights sync writes."""
    merged = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    for m in adapter_modules(adapters):
        key = f"{m}.weight"
        if key not in merged:
            raise LoRAError(f"An adapter targets {m}, but the weights have no {key}.")
        a_name, b_name = adapter_names(m)
        delta = np.asarray(adapters[b_name], np.float32) @ np.asarray(adapters[a_name], np.float32)
        merged[key] = merged[key] + delta * np.float32(cfg.scaling)
    return merged


# -- PEFT's folder format -------------------------------------------------------------------------
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


def peft_config(cfg: LoRAConfig, modules: Sequence[str], base_model_name_or_path: str = "") -> dict[str, Any]:
    """``adapter_config.json`` as PEFT writes it. Plain targets keep PEFT's suffix meaning; a regex target is
    written as the exact list of adapted modules, so PEFT adapts exactly the same layers."""
    plain = all(_PLAIN.fullmatch(t) for t in cfg.targets)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path or None,
        "r": cfg.r, "lora_alpha": int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha,
        "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
        "target_modules": sorted(cfg.targets) if plain else sorted(modules), "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": False, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }


def save_adapter(folder: str | os.PathLike, adapters: Mapping[str, Any], cfg: LoRAConfig,
                 base_model_name_or_path: str = "") -> Path:
    """Write PEFT's adapter folder (``peft.PeftModel.from_pretrained`` and vLLM load it). Each file is written to
    a temporary name and renamed, so a reader never sees a half-written file; other files in ``folder`` stay."""
    from safetensors.numpy import save_file

    modules = adapter_modules(adapters)
    dest = Path(folder)
    dest.mkdir(parents=True, exist_ok=True)
    tensors = {_PEFT_PREFIX + k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in adapters.items()}
    tmp_w, tmp_c = dest / f".{ADAPTER_WEIGHTS}.tmp-{os.getpid()}", dest / f".{ADAPTER_CONFIG}.tmp-{os.getpid()}"
    try:
        save_file(tensors, str(tmp_w), metadata={"format": "pt"})
        tmp_c.write_text(json.dumps(peft_config(cfg, modules, base_model_name_or_path), indent=2) + "\n")
        os.replace(tmp_w, dest / ADAPTER_WEIGHTS)
        os.replace(tmp_c, dest / ADAPTER_CONFIG)
    finally:
        for t in (tmp_w, tmp_c):
            t.unlink(missing_ok=True)
    return dest


_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
                "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "lora_bias": False}


def load_adapter(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], LoRAConfig]:
    """``(adapters, LoRAConfig)`` of a PEFT LoRA folder (ours or one PEFT saved), in the canonical names."""
    from diptych.core.hf import _load_any_dtype

    src = Path(folder)
    if not (src / ADAPTER_CONFIG).is_file():
        raise LoRAError(f"{src} is not an adapter folder: it has no {ADAPTER_CONFIG} (a PEFT LoRA folder holds "
                        f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}).")
    conf = json.loads((src / ADAPTER_CONFIG).read_text())
    if conf.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{src} holds a {conf.get('peft_type')} adapter; only LoRA adapters load.")
    for key, default in _UNSUPPORTED.items():
        value = conf.get(key)
        if not (value is None or value == default or value in ([], {})):
            raise LoRAError(f"{src}: adapter_config.json sets {key}={value!r}, which diptych's LoRA does not "
                            f"support (it needs {key}={default!r}).")
    targets = conf.get("target_modules")
    if not targets:
        raise LoRAError(f"{src}: adapter_config.json has no target_modules.")
    targets = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
    cfg = LoRAConfig(r=int(conf["r"]), alpha=float(conf.get("lora_alpha", 8)), dropout=float(conf.get("lora_dropout",
                     0.0)), targets=targets, use_rslora=bool(conf.get("use_rslora", False)))
    weights_file = src / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise LoRAError(f"{src} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS} (adapter_model.bin is not read: "
                        "re-save it with safe_serialization=True).")
    raw = _load_any_dtype(weights_file)  # PEFT saves in the model dtype, bf16 included
    adapters: dict[str, np.ndarray] = {}
    for k, v in raw.items():
        name = k[len(_PEFT_PREFIX):] if k.startswith(_PEFT_PREFIX) else k
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        adapters[name] = np.asarray(v, np.float32)
    adapter_modules(adapters)
    return adapters, cfg


@contextlib.contextmanager
def switched(objects: Iterable[object], attr: str, value: object) -> Iterator[None]:
    """Set ``attr`` to ``value`` on every object for the block, then restore each one's own earlier value: how both
    backends switch their LoRA layers (or a recurrent model's flag) off for the reference, nesting included."""
    objs = list(objects)
    before = [getattr(o, attr) for o in objs]
    for o in objs:
        setattr(o, attr, value)
    try:
        yield
    finally:
        for o, was in zip(objs, before):
            setattr(o, attr, was)
