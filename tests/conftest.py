"""Test-wide settings: CPU only, full-precision matmuls, Triton in interpreter mode."""

from __future__ import annotations

import os

# Must be set before jax / triton are imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.util
from contextlib import contextmanager

import pytest

HAS_JAX = importlib.util.find_spec("jax") is not None and importlib.util.find_spec("flax") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None

needs_jax = pytest.mark.skipif(not HAS_JAX, reason="jax extra not installed")
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch extra not installed")
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")
needs_triton = pytest.mark.skipif(not HAS_TRITON or not HAS_TORCH, reason="triton not installed")

BACKENDS = [
    pytest.param("jax", marks=needs_jax),
    pytest.param("torch", marks=needs_torch),
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each test using this fixture runs once per installed backend."""
    from diptych.core.backend import get_backend

    return get_backend(request.param)


def pytest_configure(config):
    if HAS_TORCH:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if HAS_JAX:
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")


@contextmanager
def count_compiles():
    """Every XLA compilation in the block (jit traces and eager primitives alike), as ``len(counter)``: the
    tests that prove a program compiles once per shape count with it."""
    import jax
    from jax._src.dispatch import BACKEND_COMPILE_EVENT

    seen: list[str] = []

    def listener(event: str, duration: float, **kw) -> None:
        if event == BACKEND_COMPILE_EVENT:
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
