"""Build a train state on either backend from the same numpy weights."""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np
import pytest


def mods(backend: str) -> tuple[ModuleType, ModuleType, ModuleType]:
    """(model, train, checkpoint) modules of ``backend``."""
    return tuple(importlib.import_module(f"diptych.backends.{backend}.{m}") for m in ("model", "train", "checkpoint"))


def state(backend: str, spec, optim, seed: int = 0, **kw):
    model, train, _ = mods(backend)
    return train.init_train_state(model.build(spec, spec.init_weights(seed)), optim, **kw)


def rel_err(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Global relative error ||a - b|| / ||b|| over all parameters."""
    num = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in b)
    den = sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in b)
    return (num / den) ** 0.5


def _has(*mods: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in mods)


needs_jax = pytest.mark.skipif(not _has("jax", "flax", "optax", "orbax"), reason="jax extra not installed")
needs_torch = pytest.mark.skipif(not _has("torch"), reason="torch extra not installed")
BACKENDS = [pytest.param("jax", marks=needs_jax), pytest.param("torch", marks=needs_torch)]
