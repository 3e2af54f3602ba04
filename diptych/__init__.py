"""diptych: one post-training algorithm, two panels (JAX and PyTorch), proven to agree."""

from typing import Any

from diptych.core.backend import Backend, available_backends, get_backend
from diptych.core.spec import DecoderSpec

_TRAINER_API = {
    "SFTConfig": "diptych.core.trainers.sft", "DPOConfig": "diptych.core.trainers.dpo",
    "GRPOConfig": "diptych.core.trainers.grpo", "GRPOLoss": "diptych.core.trainers.grpo",
    "PPOConfig": "diptych.core.trainers.ppo", "SFTTrainer": "diptych.core.trainers.api",
    "DPOTrainer": "diptych.core.trainers.api", "GRPOTrainer": "diptych.core.trainers.api",
    "PPOTrainer": "diptych.core.trainers.api", "register_trainer": "diptych.core.trainers.api",
}


def __getattr__(name: str) -> Any:
    """Trainer classes and configs load on first use, so ``import diptych`` stays light."""
    if name in _TRAINER_API:
        import importlib

        return getattr(importlib.import_module(_TRAINER_API[name]), name)
    raise AttributeError(f"module 'diptych' has no attribute {name!r}")


__all__ = ["Backend", "DecoderSpec", "available_backends", "get_backend", *_TRAINER_API]
__version__ = "0.1.0"
