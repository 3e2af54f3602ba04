"""LoRA / QLoRA on torch models by module surgery: each targeted ``nn.Linear`` becomes a :class:`LoRALinear`.

The replacement keeps the attribute name, so every HF name stays: ``q_proj.weight`` (the frozen base),
``q_proj.lora_A.weight`` / ``q_proj.lora_B.weight`` (the adapters, PEFT's names). The model's ``state_dict()``
stays the canonical *base* weights (adapters left out, an NF4 base dequantised), so ``export`` and everything
built on it are unchanged; :func:`export_adapters` gives the adapters. Adapters start from
:func:`diptych.core.lora.init_adapters` (numpy), so torch and JAX start bit-identical.

``adapters_disabled(model)`` flips a flag each :class:`LoRALinear` reads: inside it the model *is* its base
(the same float ops, bit for bit), which is how GRPO / DPO / PPO score the reference without a second copy.

Dropout (``lora.dropout > 0``) acts only inside :func:`training_dropout`, which the train step opens around each
micro-batch's forward and backward with torch's RNG forked and seeded from ``(seed, step, micro-batch)``: a run
repeats per seed and a resumed run draws the masks the uninterrupted one drew (torch's global RNG is not in a
checkpoint). Sampling, log-prob scoring, the reference and evaluation never drop, whatever ``module.training``
says. Mirrors ``diptych.backends.jax.lora`` (whose masks come from JAX's RNG, so the two backends agree at
dropout 0, not mask for mask).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diptych.core.lora import (
    LoRAConfig,
    LoRAError,
    adapter_names,
    check_adapters,
    init_adapters,
    merge_weights,
    resolve_targets,
    switched,
)
from diptych.core.model_types import is_recurrent


class _Factor(nn.Module):
    """One adapter matrix as a module, so its parameter is named ``lora_A.weight`` like PEFT's."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


def _nf4() -> Any:
    try:
        return importlib.import_module("diptych.backends.torch.nf4")
    except ImportError as e:
        raise LoRAError(f"lora.quantize_base='nf4' needs diptych's NF4 module (diptych.backends.torch.nf4), which "
                        f"could not be imported ({e}); install the lora extra (pip install 'diptych[lora]') or "
                        "set lora.quantize_base=none.") from None


class LoRALinear(nn.Module):
    """``base(x) + scaling * B A dropout(x)`` with the base frozen (PEFT's order of operations).

    ``quantized`` holds the NF4 base (``diptych.backends.torch.nf4``) instead of ``weight``; the matmul then
    dequantises inside ``linear_nf4``. ``disabled`` (set by :func:`adapters_disabled`) skips the adapter;
    ``dropout_on`` (set by :func:`training_dropout`, the train step only) drops the adapter's input.
    """

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float,
                 quantize: bool = False, double_quant: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling, self.dropout, self.disabled = float(scaling), float(dropout), False
        self.dropout_on = False
        self.quantized: Any = None
        if quantize:
            self.quantized = _nf4().quantize(base.weight.detach().float(), block_size=64, double_quant=double_quant)
            self.register_parameter("weight", None)
            self._dtype = base.weight.dtype
        else:
            self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        self.lora_A, self.lora_B = _Factor(a), _Factor(b)
        self.register_state_dict_post_hook(_base_only_state_dict)
        self.register_load_state_dict_pre_hook(_requantize)
        self.register_load_state_dict_post_hook(_adapters_optional)

    def base_weight(self) -> torch.Tensor:
        """The base weight ``[out, in]`` as the matmul sees it (an NF4 base dequantised, in the model dtype)."""
        if self.quantized is None:
            return self.weight
        return _nf4().dequantize(self.quantized).to(device=self.lora_A.weight.device, dtype=self._dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> LoRALinear:
        """``.to(device)`` / ``.cuda()`` move the NF4 container's tensors too (they are not parameters)."""
        super()._apply(fn, recurse)
        if self.quantized is not None:
            self.quantized = self.quantized.to(self.lora_A.weight.device)
            self._dtype = self.lora_A.weight.dtype
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is None:
            y = F.linear(x, self.weight, self.bias)
        else:
            y = _nf4().linear_nf4(x, self.quantized, self.bias)
        if self.disabled:
            return y
        h = F.dropout(x, self.dropout, True) if self.dropout and self.dropout_on else x
        return y + F.linear(F.linear(h, self.lora_A.weight), self.lora_B.weight) * self.scaling

    def extra_repr(self) -> str:
        r = self.lora_A.weight.shape[0]
        return (f"in={self.in_features}, out={self.out_features}, r={r}, scaling={self.scaling}, "
                f"nf4={self.quantized is not None}")


def _base_only_state_dict(module: LoRALinear, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    """The state dict is the canonical base: adapters leave it (``export_adapters`` has them), an NF4 base
    enters it dequantised (float32) under ``weight``."""
    for key in adapter_names(prefix[:-1]):
        state_dict.pop(key, None)
    if module.quantized is not None:
        state_dict[prefix + "weight"] = _nf4().dequantize(module.quantized).float()


def _requantize(module: LoRALinear, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Loading a dense ``weight`` into an NF4 layer quantises it (what ``state_dict()`` wrote comes back)."""
    key = prefix + "weight"
    if module.quantized is not None and key in state_dict:
        w = state_dict.pop(key)
        module.quantized = _nf4().quantize(w.detach().float(), block_size=module.quantized.block_size,
                                           double_quant=module.quantized.double_quant).to(module.lora_A.weight.device)


def _adapters_optional(module: LoRALinear, incompatible: Any) -> None:
    """A base-only state dict (what ``state_dict()`` gives) loads strictly: adapter keys may be absent."""
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                    if not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"))]


# -- the module-level API (the facade calls these) ---------------------------------------------
def linear_modules(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module name: (out, in)}`` of every linear LoRA may target: all ``nn.Linear`` but the output head
    (its matmul is the log-prob kernel's, not a module call)."""
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name != "lm_head"}


def apply_lora(model: nn.Module, cfg: LoRAConfig, *, adapters: Mapping[str, np.ndarray] | None = None,
               seed: int = 0) -> nn.Module:
    """Adapters on ``model``'s target linears (in place; returns it) and every base parameter frozen.

    ``adapters`` (canonical names, e.g. from :func:`diptych.core.lora.load_adapter`) replaces the fresh numpy
    init from ``seed``. Targets that match nothing, a rank above a layer's ``min(in, out)``, a second
    application, NF4 without its module: each a :class:`LoRAError` saying what to change.
    """
    if not isinstance(cfg, LoRAConfig):
        raise TypeError(f"cfg must be a LoRAConfig, got {type(cfg).__name__}.")
    if lora_config(model) is not None:
        raise LoRAError("This model already has LoRA adapters; apply_lora once per model (load_adapters replaces "
                        "their values).")
    if cfg.quantize_base == "nf4":
        _nf4()
    shapes_all = linear_modules(model)
    cfg, modules = resolve_targets(list(shapes_all), cfg, recurrent=is_recurrent(model))
    shapes = {m: shapes_all[m] for m in modules}
    values = init_adapters(shapes, cfg, seed) if adapters is None else dict(adapters)
    check_adapters(values, shapes, cfg)
    for name in modules:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base: nn.Linear = getattr(parent, attr)
        like = base.weight
        a_name, b_name = adapter_names(name)
        a, b = (torch.as_tensor(np.asarray(values[k], np.float32)).to(device=like.device, dtype=like.dtype)
                for k in (a_name, b_name))
        setattr(parent, attr, LoRALinear(base, a, b, cfg.scaling, cfg.dropout, cfg.quantize_base == "nf4",
                                         cfg.double_quant))
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith(".lora_A.weight") or n.endswith(".lora_B.weight"))
    model.lora_cfg = cfg
    return model


def lora_config(model: Any) -> LoRAConfig | None:
    """The config :func:`apply_lora` used (targets resolved); None for a model without adapters."""
    return getattr(model, "lora_cfg", None)


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    if lora_config(model) is None:
        raise LoRAError("This model has no LoRA adapters; call apply_lora(model, LoRAConfig(...)) first.")
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def export_adapters(model: nn.Module) -> dict[str, np.ndarray]:
    """The adapters as float32 numpy arrays by canonical name (``{module}.lora_A.weight`` ...)."""
    out = {}
    for name, layer in _lora_layers(model).items():
        a_name, b_name = adapter_names(name)
        out[a_name] = layer.lora_A.weight.detach().float().cpu().numpy().copy()
        out[b_name] = layer.lora_B.weight.detach().float().cpu().numpy().copy()
    return out


def load_adapters(model: nn.Module, adapters: Mapping[str, np.ndarray]) -> nn.Module:
    """Set every adapter's values (in place; returns ``model``); names and shapes must fit exactly."""
    layers = _lora_layers(model)
    cfg = lora_config(model)
    check_adapters(adapters, {n: (m.out_features, m.in_features) for n, m in layers.items()}, cfg)
    with torch.no_grad():
        for name, layer in layers.items():
            a_name, b_name = adapter_names(name)
            layer.lora_A.weight.copy_(torch.as_tensor(np.asarray(adapters[a_name], np.float32)))
            layer.lora_B.weight.copy_(torch.as_tensor(np.asarray(adapters[b_name], np.float32)))
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every forward / log-prob / generate on ``model`` is the base model's, bit for bit."""
    with switched(_lora_layers(model).values(), "disabled", True):
        yield model


def dropout_seed(seed: int, step: int, micro: int) -> int:
    """The torch RNG seed of micro-batch ``micro`` of optimizer step ``step`` in the run seeded ``seed``: a pure
    function of the three (numpy's ``SeedSequence``), so masks do not depend on what else drew from torch's RNG."""
    words = np.random.SeedSequence([int(seed) % 2**63, int(step), int(micro)]).generate_state(2, np.uint32)
    return (int(words[0]) << 32 | int(words[1])) % 2**63


@contextlib.contextmanager
def training_dropout(model: nn.Module, seed: int) -> Iterator[nn.Module]:
    """Inside, LoRA dropout acts, drawing from torch's RNG seeded ``seed`` (:func:`dropout_seed`); the global RNG
    is forked, so nothing outside sees the draws. Open it around a micro-batch's forward *and* backward: the
    backward's recomputation of a checkpointed layer (``remat``) replays the forward's masks from the RNG state
    ``torch.utils.checkpoint`` stashed, and must run with dropout on. A model without dropout is left alone."""
    cfg = lora_config(model)
    if cfg is None or not cfg.dropout:
        yield model
        return
    layers = [m for m in model.modules() if isinstance(m, LoRALinear) and m.dropout]
    device = layers[0].lora_A.weight.device if layers else torch.device("cpu")
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), switched(layers, "dropout_on", True):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield model


def base_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The canonical base weights (NF4 dequantised), float32 by HF name: the model's ``state_dict()``."""
    _lora_layers(model)
    return {k: v.detach().float().cpu().numpy().copy() for k, v in model.state_dict().items()}


def merged_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """Canonical weights with the adapters merged in (``W + scaling * B @ A``): an HF export's tensors."""
    return merge_weights(base_weights(model), export_adapters(model), lora_config(model))


def nbytes(model: nn.Module) -> int:
    """Bytes of the frozen base weights of the targeted layers as stored (NF4 packed, else dense)."""
    total = 0
    for layer in _lora_layers(model).values():
        if layer.quantized is None:
            total += layer.weight.numel() * layer.weight.element_size()
        else:
            total += int(_nf4().nbytes(layer.quantized))
    return total
