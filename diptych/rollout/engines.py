"""Pick and start a rollout engine by name (the trainers' ``rollout: native | vllm`` field)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diptych.core.sampling import SamplingConfig
from diptych.rollout.base import ENGINES, NativeEngine, RolloutEngine, RolloutEngineError, VLLMConfig, policy_lora


def make_engine(name: str, backend: Any, model: Any, *, sampling: SamplingConfig | None = None,
                vllm: VLLMConfig | Mapping[str, Any] | None = None, version: int = 0,
                max_model_len: int | None = None, **native_kwargs: Any) -> RolloutEngine:
    """The engine a trainer or ``diptych sample`` asked for by name, started on ``model``'s current weights.

    ``sampling`` is the run's sampling (it picks vLLM's log-prob mode); ``vllm`` its engine block. A LoRA model
    starts a vLLM engine (colocated, or a server of its own) on its base with its adapters (vLLM's LoRA support:
    later syncs move only the adapters), or, with ``vllm.lora_sync: merged``, on its merged weights.
    """
    if name not in ENGINES:
        raise RolloutEngineError(f"rollout engine must be one of {', '.join(ENGINES)}, got {name!r}.")
    if name == "native":
        return NativeEngine(backend, model, version, **native_kwargs)
    from diptych.core.model_types import is_recurrent

    if is_recurrent(model):
        raise RolloutEngineError(
            "vLLM cannot serve recurrent-depth models (huginn_raven): their depth loop is not a vLLM architecture; "
            "use rollout: native.")
    if native_kwargs:
        raise RolloutEngineError(f"vLLM cannot honour the native sampler option(s) {', '.join(sorted(native_kwargs))} "
                                 "(parity noise, depth); use rollout: native for them.")
    cfg = vllm if isinstance(vllm, VLLMConfig) else VLLMConfig(**dict(vllm or {}))
    lora = policy_lora(backend, model)
    adapters = lora is not None and cfg.lora_sync != "merged"
    if cfg.mode == "server":
        from diptych.rollout.server import ServerEngine

        if lora is None:
            return ServerEngine.start(model.spec, backend.export(model), sampling=sampling, config=cfg,
                                      version=version, max_model_len=max_model_len)
        return ServerEngine.start(model.spec, backend.export(model), sampling=sampling, config=cfg, version=version,
                                  max_model_len=max_model_len, lora=lora,
                                  adapters=backend.export_adapters(model) if adapters else None,
                                  merged=lambda: backend.merged_weights(model))
    weights = backend.export(model) if adapters or lora is None else backend.merged_weights(model)
    from diptych.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(model.spec, weights, sampling=sampling, config=cfg, version=version,
                      max_model_len=max_model_len, lora=lora if adapters else None,
                      adapters=backend.export_adapters(model) if adapters else None)


def trainer_engine(cfg: Any, backend: Any, model: Any, sampling: SamplingConfig) -> RolloutEngine | None:
    """The engine a GRPO / PPO config asks for, started on ``model``'s weights; None for ``rollout: native``
    (the loops then call ``backend.generate`` on the live model, exactly as before the seam existed)."""
    if getattr(cfg, "rollout", "native") == "native":
        return None
    a = getattr(cfg, "async_", None)
    if a is not None and a.enabled and a.generator == "vllm":
        return None  # the asynchronous generator starts its own engine (diptych.asyncrl.vllm_generator)
    return make_engine(cfg.rollout, backend, model, sampling=sampling, vllm=cfg.vllm,
                       max_model_len=int(cfg.max_prompt_length) + int(cfg.max_completion_length))
