"""The part of a Backend that is the same on every panel: routing each call to its module.

Each backend package (``diptych.backends.jax``, ``diptych.backends.torch``) keeps one module
per concern, file for file: ``model``, ``recurrent``, ``sampler``, ``train``, ``checkpoint``.
A backend class only says which package it is and how arrays cross the boundary; every
other method of the Backend protocol is this routing, written once. Modules are imported on
first use so that both frameworks can live in one process and a missing one fails late.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np

from diptych.core.backend import Array, Model

RECURRENT_MODEL_TYPES = ("huginn_raven",)


def model_module(package: str, spec_or_model: Any) -> ModuleType:
    """The module implementing a spec or model: ``recurrent`` for recurrent-depth ones, else ``model``."""
    spec = getattr(spec_or_model, "spec", spec_or_model)
    concern = "recurrent" if getattr(spec, "model_type", None) in RECURRENT_MODEL_TYPES else "model"
    return importlib.import_module(f"{package}.{concern}")


class Facade:
    """Every Backend method except the array boundary, delegated to ``{package}.{concern}``."""

    name: str
    package: str

    def _module(self, concern: str) -> ModuleType:
        return importlib.import_module(f"{self.package}.{concern}")

    def _impl(self, spec_or_model: Any) -> ModuleType:
        return model_module(self.package, spec_or_model)

    # -- foundation -----------------------------------------------------------------------
    def build(self, spec: Any, weights: dict[str, np.ndarray], dtype: str = "float32", **options: Any) -> Model:
        return self._impl(spec).build(spec, weights, dtype=dtype, **options)

    def export(self, model: Model) -> dict[str, np.ndarray]:
        return self._impl(model).export(model)

    def forward(self, model: Model, tokens: Array, attention_mask: Array | None = None, **kw: Any) -> Array:
        return self._impl(model).forward(model, tokens, attention_mask, **kw)

    def logprobs(self, model: Model, tokens: Array, attention_mask: Array | None, targets: Array,
                 temperature: float = 1.0, **kw: Any) -> Array:
        return self._impl(model).logprobs(model, tokens, attention_mask, targets, temperature, **kw)

    def set_depth(self, model: Model, num_steps: int | None = None, num_grad_steps: int | None = None) -> Model:
        """Recurrent-depth models: the depth r (and backprop depth k) the next calls use."""
        self._module("recurrent").set_depth(model, num_steps, num_grad_steps)
        return model

    # -- generation -----------------------------------------------------------------------
    def generate(self, model: Model, prompts: Any, sampling: Any, **kw: Any) -> Any:
        impl = self._impl(model)
        if impl.__name__.endswith(".recurrent"):
            return impl.generate(model, prompts, sampling, **kw)
        return self._module("sampler").generate(model, prompts, sampling, **kw)

    # -- trainers -------------------------------------------------------------------------
    def init_train_state(self, model: Model, optim: Any, **kw: Any) -> Any:
        return self._module("train").init_train_state(model, optim, **kw)

    def train_step(self, state: Any, microbatches: Any, loss: Any, loss_config: Any, **kw: Any) -> Any:
        return self._module("train").train_step(state, microbatches, loss, loss_config, **kw)

    def export_weights(self, state: Any) -> dict[str, np.ndarray]:
        """Canonical HF-named float32 weights of a train state (the master weights)."""
        return self._module("train").export_weights(state)

    def gradients(self, state: Any, microbatches: Any, loss: Any, loss_config: Any, **kw: Any) -> Any:
        """The full-batch gradient (canonical names) and loss, without updating: for parity checks."""
        return self._module("train").gradients(state, microbatches, loss, loss_config, **kw)

    def values(self, state: Any, tokens: Any, attention_mask: Any) -> Any:
        """Value-head predictions ``[B, T-1]`` (PPO old values); needs ``init_train_state(value_head=True)``."""
        return self._module("train").values(state, tokens, attention_mask)

    def save(self, state: Any, path: Any, **kw: Any) -> Any:
        return self._module("checkpoint").save(state, path, **kw)

    def restore(self, path: Any, **kw: Any) -> Any:
        return self._module("checkpoint").restore(path, **kw)
