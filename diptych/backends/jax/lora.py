"""LoRA / QLoRA on JAX models: each targeted ``Linear`` becomes a :class:`LoRALinear` (decoders), or each
targeted weight of a recurrent-depth model's flat parameter dict gets its adapter folded in as it is read.

Every base weight becomes a :class:`Frozen` variable (not an ``nnx.Param``), so ``nnx.state(model, nnx.Param)``
and ``nnx.split(model, nnx.Param, ...)`` yield exactly the adapters: the optimizer, its state and the gradient
hold nothing else. Names stay HF's: ``...q_proj.lora_A.weight`` / ``...q_proj.lora_B.weight`` (PEFT's). Adapters
start from :func:`diptych.core.lora.init_adapters` (numpy), so JAX and torch start bit-identical.

``adapters_disabled(model)`` sets a static flag (part of the graphdef, so the jitted base and adapted programs
are two compilations, each exact): inside it the model computes its base's float ops, bit for bit.

Dropout (``lora.dropout > 0``) acts on the adapter's input only while a key is installed with
:func:`set_dropout_rng`, which the train step does on the model it traces (one key per micro-batch, from
``(seed, step, micro-batch)``); sampling, log-prob scoring, the reference and evaluation never install one, so
they never drop. Mirrors ``diptych.backends.torch.lora``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diptych.backends.jax.model import Linear
from diptych.backends.jax.recurrent_layers import RecurrentLM
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


class Frozen(nnx.Variable):
    """A base weight under LoRA: state like any variable, but not an ``nnx.Param``, so never trained."""


class DropoutRng(nnx.Variable):
    """The dropout key of one train-step trace (a raw ``uint32[2]`` key): state, so it passes through
    ``nnx.remat`` and ``nnx.jit`` as a traced value, but never an ``nnx.Param`` and never on a stored model."""


def module_key(key: jax.Array, name: str) -> jax.Array:
    """Each adapted module draws its own mask: the step's key folded with ``crc32(module name)``."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout (``torch.nn.functional.dropout``'s): each element zeroed with probability ``rate``, the
    kept ones scaled by ``1 / (1 - rate)``, so the branch's expectation is unchanged."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def _nf4() -> Any:
    try:
        return importlib.import_module("diptych.backends.jax.nf4")
    except ImportError as e:
        raise LoRAError(f"lora.quantize_base='nf4' needs diptych's NF4 module (diptych.backends.jax.nf4), which "
                        f"could not be imported ({e}); install the lora extra (pip install 'diptych[lora]') or "
                        "set lora.quantize_base=none.") from None


def _freeze_nf4(q: Any) -> Any:
    """An NF4 container with its arrays held as :class:`Frozen` variables (state, not Params, not static)."""
    return jax.tree.map(Frozen, q)


def _thaw(q: Any) -> Any:
    return jax.tree.map(lambda v: v[...], q, is_leaf=lambda v: isinstance(v, Frozen))


class _Factor(nnx.Module):
    """One adapter matrix as a module, so its state path ends in ``lora_A.weight`` like PEFT's names."""

    def __init__(self, weight: jax.Array) -> None:
        self.weight = nnx.Param(weight)


class LoRALinear(nnx.Module):
    """``base(x) + scaling * B A dropout(x)`` with the base frozen (PEFT's order of operations), the twin of the
    torch ``LoRALinear``. ``quantized`` holds an NF4 base (``diptych.backends.jax.nf4``) instead of ``weight``."""

    def __init__(self, base: Linear, a: jax.Array, b: jax.Array, scaling: float, quantize: bool = False,
                 double_quant: bool = False, dropout: float = 0.0) -> None:
        w = base.weight[...]
        self.out_features, self.in_features = w.shape
        self.scaling, self.disabled = float(scaling), False
        self.dropout = float(dropout)  # its key (``dropout_rng``) is set only inside a train-step trace
        self.dtype_name = str(w.dtype)
        if quantize:
            self.weight = None
            self.quantized = nnx.data(_freeze_nf4(_nf4().quantize(np.asarray(w.astype(jnp.float32)), block_size=64,
                                                                  double_quant=double_quant)))
        else:
            self.weight = Frozen(w)
            self.quantized = None
        self.bias = None if base.bias is None else Frozen(base.bias[...])
        self.lora_A, self.lora_B = _Factor(a), _Factor(b)

    def base_weight(self) -> jax.Array:
        """``[out, in]`` as the matmul sees it (an NF4 base dequantised, in the model dtype)."""
        if self.quantized is None:
            return self.weight[...]
        return _nf4().dequantize(_thaw(self.quantized)).astype(self.dtype_name)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.quantized is None:
            y = x @ self.weight[...].T
            if self.bias is not None:
                y = y + self.bias[...]
        else:
            y = _nf4().linear_nf4(x, _thaw(self.quantized), None if self.bias is None else self.bias[...])
        if self.disabled:
            return y
        h = x
        rng = getattr(self, "dropout_rng", None)
        if self.dropout and rng is not None:
            h = dropout(rng[...], x, self.dropout)
        return y + ((h @ self.lora_A.weight[...].T) @ self.lora_B.weight[...].T) * self.scaling


# -- recurrent-depth models: the adapter folded into the weight as the math reads it ------------
class LoRAParams(dict):
    """A recurrent model's weights as its functions read them (``P[name]``).

    As a dict (iteration, ``.items()``, hence ``export``) it holds the base weights; ``P[name]`` of a targeted
    weight returns ``W + scaling * B @ A``, so every function of ``P`` (prelude, core loop, coda, KV-cached
    decode) runs the adapted model without knowing about LoRA, and gradients reach A and B through the
    merge. A pytree, so it passes through ``jax.jit``, ``stop_gradient`` and ``grad``.

    With a dropout key (``rng``, only inside a train step) the merged weight cannot express
    ``B A dropout(x)``, so :meth:`linear` computes the adapter branch on its own input instead, and
    :meth:`iteration` gives each recurrence its own masks.
    """

    def __init__(self, base: Mapping[str, jax.Array], factors: Mapping[str, tuple[jax.Array, jax.Array]],
                 scaling: float, rng: jax.Array | None = None, dropout: float = 0.0) -> None:
        super().__init__(base)
        self.factors, self.scaling = dict(factors), float(scaling)
        self.rng, self.dropout = rng, float(dropout)

    def linear(self, name: str, x: jax.Array) -> jax.Array:
        """``x @ P[name].T``; under dropout, ``x @ W.T + scaling * (dropout(x) @ A.T) @ B.T`` (PEFT's order)."""
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if self.rng is None or not self.dropout or module not in self.factors:
            return x @ self[name].T
        w = dict.__getitem__(self, name)
        a, b = self.factors[module]
        h = dropout(module_key(self.rng, module), x, self.dropout)
        return x @ w.T + (((h @ a.T) @ b.T) * self.scaling).astype(w.dtype)

    def iteration(self, i: Any) -> LoRAParams:
        """The same weights with the dropout key folded with recurrence ``i`` (a fresh mask per iteration, as
        torch's module drawing anew on every call); itself when there is no key."""
        if self.rng is None:
            return self
        return LoRAParams(dict(dict.items(self)), self.factors, self.scaling, jax.random.fold_in(self.rng, i),
                          self.dropout)

    def __getitem__(self, name: str) -> jax.Array:
        w = dict.__getitem__(self, name)
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module not in self.factors:
            return w
        a, b = self.factors[module]
        return w + ((b @ a) * self.scaling).astype(w.dtype)


def _flatten(p: LoRAParams) -> tuple[tuple[Any, Any, Any], Any]:
    keys = tuple(dict.keys(p))
    fkeys = tuple(p.factors)
    return ((tuple(dict.__getitem__(p, k) for k in keys), tuple(p.factors[k] for k in fkeys), p.rng),
            (keys, fkeys, p.scaling, p.dropout))


def _unflatten(aux: Any, children: Any) -> LoRAParams:
    keys, fkeys, scaling, rate = aux
    base, factors, rng = children
    return LoRAParams(dict(zip(keys, base)), dict(zip(fkeys, factors)), scaling, rng, rate)


jax.tree_util.register_pytree_node(LoRAParams, _flatten, _unflatten)


class LoRARecurrentLM(RecurrentLM):
    """A recurrent model under LoRA: ``params`` holds each base weight as :class:`Frozen` and each adapter as an
    ``nnx.Param`` under its canonical name; :meth:`param_dict` is the :class:`LoRAParams` view."""

    def param_dict(self) -> dict[str, jax.Array]:
        cfg = lora_config(self)
        base, factors = {}, {}
        for k, v in self.params.items():
            if isinstance(v, nnx.Param):
                continue  # an adapter
            base[k] = v[...] if isinstance(v, nnx.Variable) else _nf4().dequantize(_thaw(v)).astype(self.dtype_name)
        if getattr(self, "lora_disabled", False):
            return base
        for module in self.lora_modules:
            a_name, b_name = adapter_names(module)
            factors[module] = (self.params[a_name][...], self.params[b_name][...])
        rng = getattr(self, "lora_rng", None)
        return LoRAParams(base, factors, cfg.scaling, None if rng is None or not cfg.dropout else rng[...],
                          cfg.dropout)


# -- the module-level API (the facade calls these) ---------------------------------------------
def _decoder_linears(model: nnx.Module) -> dict[str, tuple[Any, str, Linear]]:
    """``{HF module name: (parent, attribute, Linear)}`` of every decoder linear but the output head."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear) and path and path[-1] != "lm_head":
            parent = model
            for p in path[:-1]:
                parent = parent[p] if isinstance(p, int) else getattr(parent, p)
            out[".".join(str(p) for p in path)] = (parent, path[-1], node)
    return out


def linear_modules(model: nnx.Module) -> dict[str, tuple[int, int]]:
    """``{module name: (out, in)}`` of every linear LoRA may target (a recurrent model's: its 2-D weights
    but the embedding and head, the same set as the torch model's ``nn.Linear`` modules)."""
    if is_recurrent(model):
        return {k[: -len(".weight")]: tuple(v.shape) for k, v in model.params.items()
                if k.endswith(".weight") and len(v.shape) == 2 and k not in ("transformer.wte.weight",
                                                                             "lm_head.weight")}
    return {name: tuple(lin.weight.shape) for name, (_, _, lin) in _decoder_linears(model).items()}


def apply_lora(model: nnx.Module, cfg: LoRAConfig, *, adapters: Mapping[str, np.ndarray] | None = None,
               seed: int = 0) -> nnx.Module:
    """Adapters on ``model``'s target linears (in place; returns it), every base weight frozen.

    ``adapters`` (canonical names, e.g. from :func:`diptych.core.lora.load_adapter`) replaces the fresh numpy
    init from ``seed``. Targets that match nothing, a rank above a layer's ``min(in, out)``, a second
    application, NF4 without its module: each a :class:`LoRAError` saying what to change. ``cfg.dropout``
    acts only in a train step (:func:`set_dropout_rng`).
    """
    if not isinstance(cfg, LoRAConfig):
        raise TypeError(f"cfg must be a LoRAConfig, got {type(cfg).__name__}.")
    if lora_config(model) is not None:
        raise LoRAError("This model already has LoRA adapters; apply_lora once per model (load_adapters replaces "
                        "their values).")
    if cfg.quantize_base == "nf4":
        _nf4()
    recurrent = is_recurrent(model)
    shapes_all = linear_modules(model)
    cfg, modules = resolve_targets(list(shapes_all), cfg, recurrent=recurrent)
    shapes = {m: shapes_all[m] for m in modules}
    values = init_adapters(shapes, cfg, seed) if adapters is None else dict(adapters)
    check_adapters(values, shapes, cfg)
    if recurrent:
        _apply_recurrent(model, cfg, modules, values)
    else:
        dtype = jnp.dtype(model.lm_head.weight[...].dtype if model.lm_head is not None
                          else model.model.embed_tokens.weight[...].dtype)
        linears = _decoder_linears(model)
        for name in modules:
            parent, attr, base = linears[name]
            a_name, b_name = adapter_names(name)
            a, b = (jnp.asarray(np.asarray(values[k], np.float32), dtype) for k in (a_name, b_name))
            layer = LoRALinear(base, a, b, cfg.scaling, cfg.quantize_base == "nf4", cfg.double_quant, cfg.dropout)
            if isinstance(attr, int):
                parent[attr] = layer
            else:
                setattr(parent, attr, layer)
        _freeze_rest(model)
    model.lora_json = json.dumps(dataclasses.asdict(cfg))  # static and hashable, so it rides in the graphdef
    return model


def _freeze_rest(model: nnx.Module) -> None:
    """Embeddings, norms and the head become :class:`Frozen` too: only adapters stay ``nnx.Param``."""
    for path, node in list(nnx.iter_graph(model)):
        if isinstance(node, nnx.Param) and path[-2] not in ("lora_A", "lora_B"):
            parent = model
            for p in path[:-2]:
                parent = parent[p] if isinstance(p, int) else getattr(parent, p)
            owner = parent[path[-2]] if isinstance(path[-2], int) else getattr(parent, path[-2])
            setattr(owner, path[-1], Frozen(node[...]))


def _apply_recurrent(model: RecurrentLM, cfg: LoRAConfig, modules: list[str], values: Mapping[str, np.ndarray]
                     ) -> None:
    dtype = jnp.dtype(model.dtype_name)
    targeted = {f"{m}.weight" for m in modules}
    for k in list(model.params):
        w = model.params[k][...]
        if cfg.quantize_base == "nf4" and k in targeted:
            model.params[k] = _freeze_nf4(_nf4().quantize(np.asarray(w.astype(jnp.float32)), block_size=64,
                                                          double_quant=cfg.double_quant))
        else:
            model.params[k] = Frozen(w)
    for m in modules:
        for k in adapter_names(m):
            model.params[k] = nnx.Param(jnp.asarray(np.asarray(values[k], np.float32), dtype))
    model.lora_modules = tuple(modules)
    model.lora_disabled = False
    model.__class__ = LoRARecurrentLM


def lora_config(model: Any) -> LoRAConfig | None:
    """The config :func:`apply_lora` used (targets resolved); None for a model without adapters."""
    raw = getattr(model, "lora_json", None)
    if raw is None:
        return None
    fields = json.loads(raw)
    fields["targets"] = tuple(fields["targets"])
    return LoRAConfig(**fields)


def _require(model: Any) -> LoRAConfig:
    cfg = lora_config(model)
    if cfg is None:
        raise LoRAError("This model has no LoRA adapters; call apply_lora(model, LoRAConfig(...)) first.")
    return cfg


def _lora_layers(model: nnx.Module) -> dict[str, LoRALinear]:
    return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, LoRALinear)}


def export_adapters(model: nnx.Module) -> dict[str, np.ndarray]:
    """The adapters as float32 numpy arrays by canonical name (``{module}.lora_A.weight`` ...)."""
    _require(model)
    if is_recurrent(model):
        return {k: np.array(model.params[k][...].astype(jnp.float32)) for m in model.lora_modules
                for k in adapter_names(m)}
    out = {}
    for name, layer in _lora_layers(model).items():
        a_name, b_name = adapter_names(name)
        out[a_name] = np.array(layer.lora_A.weight[...].astype(jnp.float32))
        out[b_name] = np.array(layer.lora_B.weight[...].astype(jnp.float32))
    return out


def load_adapters(model: nnx.Module, adapters: Mapping[str, np.ndarray]) -> nnx.Module:
    """Set every adapter's values (in place; returns ``model``); names and shapes must fit exactly."""
    cfg = _require(model)
    if is_recurrent(model):
        shapes = {m: (model.params[adapter_names(m)[1]].shape[0], model.params[adapter_names(m)[0]].shape[1])
                  for m in model.lora_modules}
        check_adapters(adapters, shapes, cfg)
        for m in model.lora_modules:
            for k in adapter_names(m):
                var = model.params[k]
                var[...] = jnp.asarray(np.asarray(adapters[k], np.float32), var[...].dtype)
        return model
    layers = _lora_layers(model)
    check_adapters(adapters, {n: (m.out_features, m.in_features) for n, m in layers.items()}, cfg)
    for name, layer in layers.items():
        a_name, b_name = adapter_names(name)
        for var, k in ((layer.lora_A.weight, a_name), (layer.lora_B.weight, b_name)):
            var[...] = jnp.asarray(np.asarray(adapters[k], np.float32), var[...].dtype)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nnx.Module) -> Iterator[nnx.Module]:
    """Inside, every forward / log-prob / generate on ``model`` is the base model's, bit for bit."""
    _require(model)
    if is_recurrent(model):  # one model-wide flag (its adapted weights are a view)
        targets, attr = [model], "lora_disabled"
    else:
        targets, attr = list(_lora_layers(model).values()), "disabled"
    with switched(targets, attr, True):
        yield model


def set_dropout_rng(model: nnx.Module, key: jax.Array | None) -> nnx.Module:
    """Install (``key``, a raw ``uint32[2]`` key) or remove (None) the dropout key on ``model``, in place.

    The train step calls this on the module it merges inside its jitted function, so the key is a traced
    argument (one compilation for every step) and the stored model never holds one. A model whose config
    has ``dropout == 0`` is left as it is, so its program is exactly the one without dropout.
    """
    cfg = _require(model)
    if not cfg.dropout:
        return model
    holders = {"": model} if is_recurrent(model) else _lora_layers(model)
    attr = "lora_rng" if is_recurrent(model) else "dropout_rng"
    for name, holder in holders.items():
        if key is not None:
            setattr(holder, attr, DropoutRng(module_key(key, name) if name else key))
        elif hasattr(holder, attr):
            delattr(holder, attr)  # never a static None: nnx would refuse a key there later
    return model


def base_weights(model: nnx.Module) -> dict[str, np.ndarray]:
    """The canonical base weights (NF4 dequantised), float32 by HF name: what ``export`` gives a plain model."""
    _require(model)
    if is_recurrent(model):
        with adapters_disabled(model):
            return {k: np.array(v.astype(jnp.float32)) for k, v in model.param_dict().items()}
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, LoRALinear):
            name = ".".join(str(p) for p in path)
            out[f"{name}.weight"] = np.array(node.base_weight().astype(jnp.float32))
            if node.bias is not None:
                out[f"{name}.bias"] = np.array(node.bias[...].astype(jnp.float32))
        elif isinstance(node, nnx.Variable) and not isinstance(node, nnx.Param) and path[-2] not in (
                "lora_A", "lora_B") and not _under_lora(model, path):
            out[".".join(str(p) for p in path)] = np.array(node[...].astype(jnp.float32))
    return out


def _under_lora(model: nnx.Module, path: tuple[Any, ...]) -> bool:
    node = model
    for p in path[:-1]:
        node = node[p] if isinstance(p, int) else getattr(node, p)
        if isinstance(node, LoRALinear):
            return True
    return False


def merged_weights(model: nnx.Module) -> dict[str, np.ndarray]:
    """Canonical weights with the adapters merged in (``W + scaling * B @ A``): an HF export's tensors."""
    return merge_weights(base_weights(model), export_adapters(model), _require(model))


def _nf4_slots(model: nnx.Module) -> dict[str, tuple[Any, Any, Any]]:
    """``{module.weight: (owner, key, NF4 container of Frozen leaves)}`` of every NF4 base in a LoRA model."""
    if isinstance(model, LoRARecurrentLM):
        return {k: (model.params, k, v) for k, v in model.params.items() if hasattr(_thaw(v), "arrays")}
    return {f"{name}.weight": (layer, "quantized", layer.quantized) for name, layer in _lora_layers(model).items()
            if layer.quantized is not None}


def export_quantized(model: nnx.Module) -> dict[str, np.ndarray]:
    """``{module.weight.field: array}`` of every NF4 base as stored (``codes``, ``absmax`` and, double-quantised,
    its scale and offset): what a QLoRA checkpoint writes, since re-quantising the dequantised base is not exact
    for a double-quantised one. Empty for a model without an NF4 base."""
    _require(model)
    return {f"{name}.{field}": np.asarray(a) for name, (_, _, q) in _nf4_slots(model).items()
            for field, a in _thaw(q).arrays().items()}


def load_quantized(model: nnx.Module, arrays: Mapping[str, np.ndarray]) -> nnx.Module:
    """Replace every NF4 base of ``model`` by the stored one (:func:`export_quantized`'s form), in place."""
    _require(model)
    slots = _nf4_slots(model)
    missing = [f"{name}.{field}" for name, (_, _, q) in slots.items() for field in _thaw(q).arrays()
               if f"{name}.{field}" not in arrays]
    if missing:
        raise LoRAError(f"The stored NF4 base lacks {', '.join(missing[:3])}; pass every array export_quantized "
                        "gave (the QLoRA checkpoint is incomplete).")
    for name, (owner, key, q) in slots.items():
        plain = _thaw(q)
        fields = {f: jnp.asarray(arrays[f"{name}.{f}"], a.dtype) for f, a in plain.arrays().items()}
        frozen = _freeze_nf4(dataclasses.replace(plain, **fields))
        if isinstance(owner, dict) or key != "quantized":
            owner[key] = frozen
        else:
            owner.quantized = nnx.data(frozen)
    return model


def nbytes(model: nnx.Module) -> int:
    """Bytes of the frozen base weights of the targeted layers as stored (NF4 packed, else dense)."""
    cfg = _require(model)
    if is_recurrent(model):
        total = 0
        for m in model.lora_modules:
            v = model.params[f"{m}.weight"]
            total += int(_nf4().nbytes(_thaw(v))) if cfg.quantize_base == "nf4" else int(v[...].nbytes)
        return total
    total = 0
    for layer in _lora_layers(model).values():
        total += int(layer.weight[...].nbytes) if layer.quantized is None else int(_nf4().nbytes(
            _thaw(layer.quantized)))
    return total
