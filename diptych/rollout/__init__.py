"""Rollout engines: who samples for the trainers (the backend's native sampler or vLLM).

See :mod:`diptych.rollout.base` for the protocol; vLLM is imported only when a vLLM engine starts.
"""

from diptych.rollout.base import (
    ENGINES,
    NativeEngine,
    RolloutEngine,
    RolloutEngineError,
    VLLMConfig,
)
from diptych.rollout.engines import make_engine

__all__ = ["ENGINES", "NativeEngine", "RolloutEngine", "RolloutEngineError", "VLLMConfig", "make_engine"]
