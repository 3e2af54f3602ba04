"""Tiny models for the LoRA tests: diptych decoders and recurrent models from a numpy seed, and transformers
checkpoints (Llama, Qwen2 with biases, Qwen3 with q/k norms) written by ``save_pretrained`` as the PEFT oracle's
base. Every shape is small and shared, so each backend compiles a handful of programs for the whole folder."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from diptych.core.backend import get_backend
from diptych.core.lora import LoRAConfig
from diptych.parity.harness import left_padded_batch
from tests.conftest import HAS_JAX, HAS_TORCH

VOCAB = 96
LENGTHS = [9, 6]
"""A left-padded batch of two rows."""

HF_TINY: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)
HF_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", {"head_dim": 8}),  # q/k norms
}


def batch(vocab: int = VOCAB, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return left_padded_batch(vocab, LENGTHS, seed)


def random_adapters(adapters: dict[str, np.ndarray], seed: int = 1, scale: float = 0.2) -> dict[str, np.ndarray]:
    """The same names and shapes with every entry drawn at random (B nonzero, so the adapters act)."""
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in sorted(adapters.items())}


def to_np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def lora_module(name: str) -> Any:
    import importlib

    return importlib.import_module(f"diptych.backends.{name}.lora")


def build(name: str, spec: Any, weights: dict[str, np.ndarray]) -> Any:
    backend = get_backend(name)
    return backend.build(spec, weights, **({"device": "cpu"} if name == "torch" else {}))


@pytest.fixture(scope="session")
def decoder() -> tuple[Any, dict[str, np.ndarray]]:
    """A tiny Llama spec (GQA, untied head) and its numpy weights."""
    from diptych.core.spec import tiny_spec

    spec = tiny_spec("llama")
    return spec, spec.init_weights(0)


@pytest.fixture(scope="session")
def recurrent() -> tuple[Any, dict[str, np.ndarray]]:
    """A tiny Huginn-format recurrent-depth spec and its numpy weights."""
    from diptych.core.recurrent_spec import tiny_recurrent_spec

    spec = tiny_recurrent_spec()
    return spec, spec.init_weights(0)


def build_hf(model_type: str, seed: int = 0) -> Any:
    """A transformers model with every parameter random (norms near 1), so a dropped bias or norm shows."""
    import torch
    import transformers

    cls, extra = HF_CASES[model_type]
    config = getattr(transformers, cls)(**{**HF_TINY, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.15 * noise)
    return model.eval()


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory) -> dict[str, Any]:
    """model type -> a folder written by transformers' ``save_pretrained``."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("lora_hf")
    out = {}
    for model_type in HF_CASES:
        build_hf(model_type).save_pretrained(root / model_type)
        out[model_type] = root / model_type
    return out


BACKEND_NAMES = [pytest.param("jax", marks=pytest.mark.skipif(not HAS_JAX, reason="jax extra not installed")),
                 pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="torch not installed"))]
both_backends = pytest.mark.skipif(not (HAS_JAX and HAS_TORCH), reason="needs both backends")
SMALL = LoRAConfig(r=4, alpha=8.0)
