"""The rollout-engine seam: one small protocol between the trainers and whatever samples for them.

A trainer asks an engine for completions (``generate``), pushes its weights after each optimizer
step (``sync_weights``, with a version number the two sides agree on) and closes it at the end. It
never learns which engine it has: the native KV-cached sampler of its own backend (the parity
reference, and the only sampler for recurrent-depth models) or vLLM, colocated in the trainer's
process or behind a loopback HTTP server. Weights cross the seam in one form only, the canonical
Hugging Face-named float32 numpy arrays of ``backend.export`` / ``backend.export_weights``, which is
why a JAX trainer feeds vLLM exactly as a torch one does.

This module imports neither vLLM nor a framework: it is what the trainers import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from diptych.core.sampling import Rollout, SamplingConfig

ENGINES: tuple[str, ...] = ("native", "vllm")
"""The values of a trainer config's ``rollout`` field."""

VLLM_MODES: tuple[str, ...] = ("colocated", "server")
LOGPROB_MODES: tuple[str, ...] = ("auto", "processed", "raw")
WEIGHT_CHANNELS: tuple[str, ...] = ("http", "collective")
SLEEP_MODES: tuple[str, ...] = ("auto", "on", "off")
LORA_SYNC_MODES: tuple[str, ...] = ("auto", "adapters", "merged")
SYNC_MODES: tuple[str, ...] = ("full", "adapters", "merged")
"""What a weight sync moved, as the ``sync/mode`` metric codes it (0, 1, 2): every canonical weight, only the
LoRA adapters (the engine's base stays shared), or the LoRA model's merged weights (an engine without LoRA)."""

WeightsLike = Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]
"""Canonical weights as a dict or as an iterator of ``(hf_name, array)`` pairs (streamed, one at a time)."""


class RolloutEngineError(RuntimeError, ValueError):
    """An engine that cannot start, cannot serve this model or sampling option, or stopped answering.

    Also a ValueError, so the commands report it in one line like every other user-facing error."""


@runtime_checkable
class RolloutEngine(Protocol):
    """What every rollout engine implements.

    ``generate`` returns a :class:`~diptych.core.sampling.Rollout` whose ``extras`` carry
    ``weight_version`` (the version the samples were drawn with), ``engine`` and ``logprob_basis``.
    Its log-probs are full-vocabulary ``log_softmax(logits / temperature)`` of the chosen tokens,
    the basis the trainer recomputes, unless ``logprob_basis`` says otherwise (``raw``: the
    untempered full-vocabulary basis vLLM keeps when a top-k / top-p / min-p filter is active).
    """

    name: str

    @property
    def weight_version(self) -> int:
        """The version of the weights the next ``generate`` samples with."""
        ...

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                 seed: int | None = None) -> Rollout:
        """``sampling.n`` completions per prompt; row ``i * n + j`` is sample ``j`` of prompt ``i``."""
        ...

    def sync_weights(self, weights: WeightsLike, version: int) -> None:
        """Replace the engine's weights by these canonical ones and adopt ``version``."""
        ...

    def close(self) -> None:
        """Free the engine (idempotent)."""
        ...


@dataclass
class VLLMConfig:
    """How a vLLM engine runs; the ``vllm:`` block of a GRPO / PPO config.

    Memory is always bounded: vLLM reserves 92% of RAM (CPU) or of the GPU without a budget.
    ``kv_cache_memory_bytes`` wins when both are set; ``gpu_memory_utilization`` alone is the GPU form.
    """

    mode: Literal["colocated", "server"] = "colocated"
    """``colocated``: ``vllm.LLM`` in the trainer's process; ``server``: ``diptych rollout-server`` over HTTP."""
    url: str | None = None
    """Server mode: the server's address (``http://127.0.0.1:PORT``); None starts one on loopback."""
    kv_cache_memory_bytes: int | None = 64 << 20
    """The KV-cache budget in bytes (64 MiB fits the tests' tiny models)."""
    gpu_memory_utilization: float | None = None
    """The fraction of GPU memory vLLM may take (weights + KV cache), used when kv_cache_memory_bytes is None."""
    max_model_len: int | None = None
    """Longest prompt + completion; None: the model's context (max_position_embeddings)."""
    dtype: str = "float32"
    enforce_eager: bool = True
    """No CUDA graphs / torch.compile: fast start, and what the CPU build needs."""
    logprobs: Literal["auto", "processed", "raw"] = "auto"
    """Sampler log-prob basis. ``auto``: ``processed`` (= log_softmax(logits / T)) unless the run's sampling has a
    top-k / top-p / min-p filter, then ``raw`` (full vocabulary, before temperature and filters)."""
    sleep: Literal["auto", "on", "off"] | bool = "auto"
    """Sleep mode: the engine offloads its weights and frees its KV cache while the trainer trains (``sleep(level=1)``
    after each rollout, ``wake_up()`` before the next generate or sync). ``auto``: on with CUDA, off on CPU, where
    vLLM has no sleep mode; ``on`` without CUDA is refused. YAML's bare on/off (booleans) mean on/off."""
    weight_channel: Literal["http", "collective"] = "http"
    """Server mode: how weights reach the server. ``http``: safetensors bytes over the control channel;
    ``collective``: a broadcast over a private two-rank group (NCCL between GPUs, gloo otherwise)."""
    lora_sync: Literal["auto", "adapters", "merged"] = "auto"
    """A LoRA policy: ``adapters`` syncs only the adapters (vLLM's LoRA support; the base stays shared), ``merged``
    the merged weights; ``auto`` adapters where the engine serves LoRA, merged otherwise."""
    enable_prefix_caching: bool = True
    seed: int = 0
    timeout_s: float = 600.0
    """Server mode: seconds to wait for the server to start and for each request."""

    def __post_init__(self) -> None:
        if self.mode not in VLLM_MODES:
            raise RolloutEngineError(f"vllm.mode must be one of {', '.join(VLLM_MODES)}, got {self.mode!r}.")
        if isinstance(self.sleep, bool):
            self.sleep = "on" if self.sleep else "off"
        if self.sleep not in SLEEP_MODES:
            raise RolloutEngineError(f"vllm.sleep must be one of {', '.join(SLEEP_MODES)}, got {self.sleep!r}.")
        if self.weight_channel not in WEIGHT_CHANNELS:
            raise RolloutEngineError(f"vllm.weight_channel must be one of {', '.join(WEIGHT_CHANNELS)}, got "
                                     f"{self.weight_channel!r}.")
        if self.weight_channel == "collective" and self.mode != "server":
            raise RolloutEngineError("vllm.weight_channel=collective is for server mode (a colocated engine shares "
                                     "the trainer's memory); set vllm.mode=server or weight_channel=http.")
        if self.lora_sync not in LORA_SYNC_MODES:
            raise RolloutEngineError(f"vllm.lora_sync must be one of {', '.join(LORA_SYNC_MODES)}, got "
                                     f"{self.lora_sync!r}.")
        if self.logprobs not in LOGPROB_MODES:
            raise RolloutEngineError(f"vllm.logprobs must be one of {', '.join(LOGPROB_MODES)}, got "
                                     f"{self.logprobs!r}.")
        if self.kv_cache_memory_bytes is not None and int(self.kv_cache_memory_bytes) < 1 << 20:
            raise RolloutEngineError(f"vllm.kv_cache_memory_bytes must be at least 1 MiB (1048576), got "
                                     f"{self.kv_cache_memory_bytes}.")
        if self.gpu_memory_utilization is not None and not 0.0 < float(self.gpu_memory_utilization) <= 1.0:
            raise RolloutEngineError(f"vllm.gpu_memory_utilization must be in (0, 1], got "
                                     f"{self.gpu_memory_utilization}.")
        if self.kv_cache_memory_bytes is None and self.gpu_memory_utilization is None:
            raise RolloutEngineError("vLLM needs a memory bound: set vllm.kv_cache_memory_bytes (bytes of KV cache) "
                                     "or vllm.gpu_memory_utilization (a fraction of the GPU).")
        if self.max_model_len is not None and int(self.max_model_len) < 2:
            raise RolloutEngineError(f"vllm.max_model_len must be >= 2, got {self.max_model_len}.")
        if self.url is not None and not str(self.url).startswith(("http://", "https://")):
            raise RolloutEngineError(f"vllm.url must be an http:// address such as http://127.0.0.1:8011, got "
                                     f"{self.url!r}.")
        if self.url is not None and self.mode != "server":
            raise RolloutEngineError("vllm.url is for server mode; set vllm.mode=server or drop vllm.url.")
        if float(self.timeout_s) <= 0:
            raise RolloutEngineError(f"vllm.timeout_s must be > 0, got {self.timeout_s}.")


def filtered(sampling: SamplingConfig) -> bool:
    """Whether a top-k, top-p or min-p filter is active (greedy decoding filters nothing)."""
    return not sampling.greedy and (sampling.top_k > 0 or sampling.top_p < 1.0 or sampling.min_p > 0.0)


def resolve_logprobs_mode(mode: str, sampling: SamplingConfig | None) -> Literal["processed", "raw"]:
    """``auto`` -> ``processed`` without a filter (it is then exactly the trainer's basis), ``raw`` with one
    (processed log-probs renormalise over the filtered set and would bias the importance ratio)."""
    if mode not in LOGPROB_MODES:
        raise RolloutEngineError(f"logprobs mode must be one of {', '.join(LOGPROB_MODES)}, got {mode!r}.")
    if mode != "auto":
        return mode  # type: ignore[return-value]
    return "raw" if sampling is not None and filtered(sampling) else "processed"


def logprob_basis(mode: str, sampling: SamplingConfig) -> str:
    """What the log-probs of one generate call are: ``trainer`` (= log_softmax(logits / T), full vocabulary)
    or ``raw`` (full vocabulary at T = 1: the trainer's basis only when T is 1)."""
    if mode == "processed" or sampling.greedy or sampling.temperature == 1.0:
        return "trainer"
    return "raw"


def weight_items(weights: WeightsLike) -> Iterator[tuple[str, np.ndarray]]:
    """Canonical weights as ``(name, float32 array)`` pairs, checked one by one as they stream past."""
    if weights is None:
        raise RolloutEngineError("sync_weights needs weights: a {hf_name: array} dict or an iterator of "
                                 "(hf_name, array) pairs (backend.export_weights(state)).")
    items = weights.items() if isinstance(weights, Mapping) else weights
    for pair in items:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
            raise RolloutEngineError(f"weights must be (hf_name, array) pairs; got {type(pair).__name__} "
                                     f"{str(pair)[:60]!r}.")
        name, arr = pair
        a = np.asarray(arr)
        if a.dtype.kind != "f":
            raise RolloutEngineError(f"weight {name!r} has dtype {a.dtype}; canonical weights are float arrays.")
        yield name, np.ascontiguousarray(a, dtype=np.float32)


def check_version(version: Any, current: int) -> int:
    """A new weight version: an int, never older than the current one (stale weights would go unnoticed)."""
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
        raise RolloutEngineError(f"weight version must be an int (the trainer's step), got {version!r}.")
    v = int(version)
    if v < current:
        raise RolloutEngineError(f"weight version {v} is older than the engine's {current}; versions only go up "
                                 "(pass the trainer's step after the update).")
    return v


def with_version(rollout: Rollout, engine: str, version: int, basis: str) -> Rollout:
    """Stamp a rollout with the engine and weight version it came from."""
    rollout.extras.update(engine=engine, weight_version=int(version), logprob_basis=basis)
    return rollout


def sampling_to_dict(sampling: SamplingConfig) -> dict[str, Any]:
    """A JSON-able form of a sampling config (the server's wire format)."""
    out = dataclasses.asdict(sampling)
    out["stop_sequences"] = [list(s) for s in sampling.stop_sequences]
    out["eos_ids"] = None if sampling.eos_ids is None else list(sampling.eos_ids)
    return out


def sampling_from_dict(d: Mapping[str, Any]) -> SamplingConfig:
    names = {f.name for f in dataclasses.fields(SamplingConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise RolloutEngineError(f"unknown sampling field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}.")
    kw = dict(d)
    if kw.get("eos_ids") is not None:
        kw["eos_ids"] = tuple(kw["eos_ids"])
    if "stop_sequences" in kw:
        kw["stop_sequences"] = tuple(tuple(s) for s in kw["stop_sequences"])
    return SamplingConfig(**kw)


class NativeEngine:
    """The backend's own KV-cached sampler behind the engine protocol.

    It samples from ``model`` (the trainer's live model, or one it builds from synced weights), so it
    is the reference every other engine is compared with, and the engine of recurrent-depth models.
    ``generate_kwargs`` are the backend's own options (a recurrent model's depth, parity noise).
    """

    name = "native"

    def __init__(self, backend: Any, model: Any, version: int = 0, **generate_kwargs: Any) -> None:
        self.backend, self.model = backend, model
        self._version = check_version(version, 0)
        self.generate_kwargs = generate_kwargs
        self.last_sync: dict[str, Any] = {}

    @property
    def weight_version(self) -> int:
        return self._version

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, seed: int | None = None,
                 **kw: Any) -> Rollout:
        if self.model is None:
            raise RolloutEngineError("this native engine was closed; make a new one.")
        opts = {**self.generate_kwargs, **kw}
        if seed is not None:
            opts["seed"] = seed
        rollout = self.backend.generate(self.model, prompts, sampling, **opts)
        return with_version(rollout, self.name, self._version, "trainer")

    def sync_weights(self, weights: WeightsLike, version: int) -> None:
        """Rebuild the model from canonical weights (a trainer that shares its live model needs no sync)."""
        version = check_version(version, self._version)
        if self.model is None:
            raise RolloutEngineError("this native engine was closed; make a new one.")
        self.model = self.backend.build(self.model.spec, dict(weight_items(weights)))
        self._version = version

    def set_model(self, model: Any, version: int) -> None:
        """Sample from ``model`` from now on (the trainer's live model after a step): a sync without a copy."""
        self._version = check_version(version, self._version)
        self.model = model

    def close(self) -> None:
        self.model = None


def check_rollout_config(rollout: str, vllm: VLLMConfig | Mapping[str, Any] | None, *, parity: bool = False,
                         depth: Any = None) -> VLLMConfig:
    """Validate a trainer config's ``rollout`` / ``vllm`` pair; returns the ``vllm`` block as a VLLMConfig.

    Refused up front, not at the first step: an unknown engine, and vLLM with options only the native
    sampler honours (parity noise, a recurrent model's depth).
    """
    if rollout not in ENGINES:
        raise RolloutEngineError(f"rollout must be one of {', '.join(ENGINES)}, got {rollout!r}.")
    cfg = vllm if isinstance(vllm, VLLMConfig) else VLLMConfig(**dict(vllm or {}))
    if rollout == "vllm":
        if parity:
            raise RolloutEngineError("parity: true needs the native sampler (vLLM draws its own noise); set "
                                     "rollout: native or parity: false.")
        if depth is not None:
            raise RolloutEngineError("depth is for recurrent-depth models, which vLLM cannot serve; set "
                                     "rollout: native.")
    return cfg


def sample_with(engine: RolloutEngine, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                seed: int | None) -> Rollout:
    """A trainer's rollout from ``engine``: checked to come from the weights the trainer last pushed, then the
    engine is put to sleep (GPU vLLM frees its memory for the train phase; other engines ignore it)."""
    rollout = engine.generate(prompts, sampling, seed=seed)
    got = rollout.extras.get("weight_version")
    if got != engine.weight_version:
        raise RolloutEngineError(f"the rollout was sampled with weight version {got}, but the trainer pushed "
                                 f"{engine.weight_version}; the engine did not load the last sync.")
    sleep = getattr(engine, "sleep", None)
    if callable(sleep):
        sleep()
    return rollout


def policy_lora(backend: Any, model: Any) -> Any:
    """The LoRAConfig of a policy with adapters, None for a fully trained one (or a backend without LoRA)."""
    lora_config = getattr(backend, "lora_config", None)
    return lora_config(model) if callable(lora_config) and model is not None else None


def push_weights(engine: RolloutEngine, backend: Any, state: Any) -> int:
    """Push a train state's weights as the engine's next version (after every optimizer step).

    A LoRA policy sends only its adapters to an engine that serves LoRA (``engine.serves_lora``: vLLM colocated or
    a server with LoRA slots; the base stays shared), and its merged weights to any other; what moved is in
    ``engine.last_sync`` (see :func:`sync_metrics`). The trainer does not know which engine it feeds."""
    version = engine.weight_version + 1
    start = time.perf_counter()
    lora = policy_lora(backend, getattr(state, "model", None))
    if lora is not None and getattr(engine, "serves_lora", False):
        engine.sync_adapters(backend.export_adapters(state.model), lora, version)  # type: ignore[attr-defined]
        mode = "adapters"
    else:
        engine.sync_weights(backend.export_weights(state), version)  # a LoRA state's export is merged
        mode = "full" if lora is None else "merged"
    info = dict(getattr(engine, "last_sync", None) or {})
    info.update(mode=mode, seconds=time.perf_counter() - start)
    with contextlib.suppress(AttributeError):  # an engine with a read-only last_sync: its own record stands
        engine.last_sync = info  # type: ignore[attr-defined]
    return version


def sync_metrics(engine: Any) -> dict[str, float]:
    """Per-step metrics of the last :func:`push_weights`: ``sync/mode`` (0 full, 1 adapters, 2 merged: the codes
    of :data:`SYNC_MODES`) and ``sync/bytes`` (what crossed to the engine). Empty for an engine never synced."""
    info = getattr(engine, "last_sync", None) or {}
    out: dict[str, float] = {}
    if info.get("mode") in SYNC_MODES:
        out["sync/mode"] = float(SYNC_MODES.index(info["mode"]))
    if "bytes" in info:
        out["sync/bytes"] = float(info["bytes"])
    return out
