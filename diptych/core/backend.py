"""The Backend protocol and the registry that picks one by name.

Trainers, samplers and the parity harness see a framework only through this contract, so
that one algorithm runs on JAX or on PyTorch unchanged. Models and train states are opaque
handles owned by the backend; arrays cross the boundary only through ``to_numpy`` and
``from_numpy``. Backends are imported lazily: both may live in one process (parity tests
need that), and a missing framework is an error only when somebody asks for it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import os
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    from diptych.core.lora import LoRAConfig
    from diptych.core.optim import OptimConfig
    from diptych.core.sampling import Rollout, SamplingConfig
    from diptych.core.spec import DecoderSpec

ENV_VAR = "DIPTYCH_BACKEND"

Model = Any
"""A backend-owned model handle (an ``nnx.Module`` on JAX, a ``torch.nn.Module`` on torch)."""

TrainState = Any
"""A backend-owned train state (weights, optimizer state, ``step``, ``model``); opaque to the core."""

Array = Any
"""A backend-native array (``jax.Array`` or ``torch.Tensor``)."""


@runtime_checkable
class Backend(Protocol):
    """What every backend implements: the whole surface the trainers, samplers, parity harness and
    commands call (``tests/test_backend_protocol.py`` checks both backends against it).

    All ``tokens`` / ``attention_mask`` inputs are ``[batch, time]`` integer arrays with
    LEFT padding (mask 0 on the pad side); positions are derived from the mask, so a padded
    row gives the same numbers as the same row unpadded. A backend may accept extra keyword
    options (a torch ``device``, a decoder's ``kernels`` mode, a recurrent model's depth); the core
    passes only the arguments below.
    """

    name: str

    # -- boundary -----------------------------------------------------------------------------
    def to_numpy(self, x: Array) -> np.ndarray:
        """Copy a backend array to host numpy (bf16 is returned as float32)."""
        ...

    def from_numpy(self, a: np.ndarray, dtype: str | None = None) -> Array:
        """Make a backend array from numpy, optionally casting (``"float32"``, ``"bfloat16"``)."""
        ...

    # -- foundation ---------------------------------------------------------------------------
    def build(self, spec: DecoderSpec, weights: dict[str, np.ndarray], dtype: str = "float32") -> Model:
        """Instantiate ``spec`` (a decoder or recurrent spec) with canonical (Hugging Face-named) numpy weights."""
        ...

    def export(self, model: Model) -> dict[str, np.ndarray]:
        """Return the canonical ``{hf_name: float32 numpy array}`` dict of ``model``."""
        ...

    def forward(self, model: Model, tokens: Array, attention_mask: Array | None = None) -> Array:
        """Logits ``[batch, time, vocab]`` (float32) for a left-padded batch."""
        ...

    def logprobs(self, model: Model, tokens: Array, attention_mask: Array | None, targets: Array,
                 temperature: float = 1.0) -> Array:
        """Per-token ``log_softmax(logits / temperature)[targets]``, ``[batch, time]`` float32."""
        ...

    def set_depth(self, model: Model, num_steps: int | None = None, num_grad_steps: int | None = None) -> Model:
        """Recurrent-depth models: the depth r (and backprop depth k) the next calls and train steps use."""
        ...

    # -- generation ---------------------------------------------------------------------------
    def generate(self, model: Model, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> Rollout:
        """Sample ``sampling.n`` completions per prompt (token ids, sampler log-probs, masks)."""
        ...

    # -- training -----------------------------------------------------------------------------
    def init_train_state(self, model: Model, optim: OptimConfig, *, value_head: bool = False,
                         seed: int = 0) -> TrainState:
        """Wrap a built model for training with AdamW (a float32 master copy under bf16; a value head for PPO)."""
        ...

    def train_step(self, state: TrainState, microbatches: Sequence[Mapping[str, np.ndarray]],
                   loss: str | Mapping[str, float], loss_config: Any, *,
                   temperature: float = 1.0) -> tuple[TrainState, dict[str, float]]:
        """One AdamW update from the gradient accumulated over ``microbatches`` and divided once (DESIGN.md rule 3).

        ``loss`` is a registered loss name (``diptych.core.losses.register_loss``; built in: ``sft``, ``policy``,
        ``value``, ``preference``) with ``loss_config`` its config, or a weighted mapping such as
        ``{"policy": 1.0, "value": 0.1}`` with ``loss_config`` a mapping of configs by name. Each micro-batch
        follows its losses' registered layout (:mod:`diptych.core.train_batch`); a ``policy`` micro-batch may
        omit ``old_logprobs`` (the detached current log-probs stand in). Returns ``(state, metrics)``:
        ``loss``, ``grad_norm`` (before clipping), ``lr``, ``denominator`` (of the first term), ``tokens``,
        ``skipped`` (1 when a non-finite loss or gradient left weights and optimizer untouched),
        ``sampler_logprob_gap`` (max ``|logprobs - sampler_logprobs|`` over the mask, when given) and each
        loss's metrics (prefixed ``term/`` when there are several terms). Callers use the returned state."""
        ...

    def gradients(self, state: TrainState, microbatches: Sequence[Mapping[str, np.ndarray]],
                  loss: str | Mapping[str, float], loss_config: Any, *,
                  temperature: float = 1.0) -> tuple[dict[str, np.ndarray], float]:
        """The full-batch gradient by canonical name and the loss, without updating: what parity compares."""
        ...

    def values(self, state: TrainState, tokens: Array, attention_mask: Array) -> Array:
        """Value-head predictions ``[B, T - 1]`` (PPO old values); needs ``init_train_state(value_head=True)``."""
        ...

    def export_weights(self, state: TrainState) -> dict[str, np.ndarray]:
        """Canonical HF-named float32 weights of a train state (the master weights, no value head; a LoRA state's
        base with its adapters merged)."""
        ...

    # -- adapters (LoRA, diptych.core.lora) ---------------------------------------------------
    def apply_lora(self, model: Model, cfg: LoRAConfig, *, adapters: dict[str, np.ndarray] | None = None,
                   seed: int = 0) -> Model:
        """Adapters on ``model``'s target linears (numpy init from ``seed``, or ``adapters``); every base weight
        frozen, so ``init_train_state`` trains the adapters only."""
        ...

    def export_adapters(self, model: Model) -> dict[str, np.ndarray]:
        """A LoRA model's adapters by canonical name (``{module}.lora_A.weight`` / ``.lora_B.weight``)."""
        ...

    def merged_weights(self, model: Model) -> dict[str, np.ndarray]:
        """A LoRA model's canonical weights with its adapters merged into the base (what an HF export holds)."""
        ...

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, state: TrainState, path: str | os.PathLike[str], *, metadata: dict[str, Any] | None = None,
             keep_last: int | None = None) -> Path:
        """Write ``state`` and the caller's JSON-able ``metadata`` atomically to the directory ``path``."""
        ...

    def restore(self, path: str | os.PathLike[str]) -> tuple[TrainState, dict[str, Any]]:
        """Load a checkpoint written by :meth:`save`: ``(state, metadata)``; training continues exactly."""
        ...


ADAPTER_DIR = "adapter"
"""Where a LoRA checkpoint, and a LoRA run's ``final/`` folder, keep the adapters: a PEFT adapter folder."""


@dataclass(frozen=True)
class AdaptersOff:
    """A LoRA model seen with its adapters switched off: the frozen base, and so the reference policy of
    GRPO / DPO / PPO with LoRA, without a second copy of the weights.

    A handle, not a model: every backend call that takes a model (``forward``, ``logprobs``, ``generate``,
    ``set_depth``, ``export``) runs ``model`` under the backend's ``adapters_disabled``. On JAX the policy's
    module is rebuilt each step, but the base it shares is never trained, so the handle of any step's module
    is the same reference.
    """

    model: Any

    @property
    def spec(self) -> Any:
        return self.model.spec


PROTOCOL_METHODS: tuple[str, ...] = tuple(
    n for n, v in vars(Backend).items() if callable(v) and not n.startswith("_")
)
"""The names of the Backend methods, in declaration order."""


@dataclass(frozen=True)
class _Entry:
    module: str
    attr: str
    requires: tuple[str, ...]
    extra: str


_REGISTRY: dict[str, _Entry] = {
    "jax": _Entry("diptych.backends.jax", "JaxBackend", ("jax", "flax", "optax"), "jax"),
    "torch": _Entry("diptych.backends.torch", "TorchBackend", ("torch",), "torch"),
}
_INSTANCES: dict[str, Backend] = {}


class BackendError(RuntimeError):
    """A backend was asked for that does not exist or cannot be imported."""


def register_backend(name: str, module: str, attr: str, requires: tuple[str, ...], extra: str) -> None:
    """Register a third-party backend class ``module:attr`` under ``name``."""
    _REGISTRY[name] = _Entry(module, attr, requires, extra)


def backend_names() -> list[str]:
    """Every registered backend name, installed or not."""
    return sorted(_REGISTRY)


def is_installed(name: str) -> bool:
    """Whether the framework modules behind backend ``name`` can be imported."""
    entry = _REGISTRY.get(name)
    return entry is not None and all(importlib.util.find_spec(m) is not None for m in entry.requires)


def backend_modules(name: str) -> tuple[str, ...]:
    """The modules backend ``name`` imports (its frameworks, then its own): what a process that will use it can
    load ahead of time (the asynchronous generator's fork server)."""
    entry = _REGISTRY[resolve_backend_name(name)]
    return (*entry.requires, entry.module)


def available_backends() -> list[str]:
    """Registered backends whose frameworks are installed."""
    return [n for n in backend_names() if is_installed(n)]


def resolve_backend_name(name: str | None = None) -> str:
    """Apply the precedence rule: explicit argument, then ``$DIPTYCH_BACKEND``, else an error."""
    chosen = name or os.environ.get(ENV_VAR) or None
    if chosen is None:
        raise BackendError(
            f"No backend chosen. Pass backend=... (or --backend on the CLI) or set {ENV_VAR}; "
            f"choices: {', '.join(backend_names())} (installed: {', '.join(available_backends()) or 'none'})."
        )
    chosen = chosen.strip().lower()
    if chosen not in _REGISTRY:
        raise BackendError(f"Unknown backend {chosen!r}; choices: {', '.join(backend_names())}.")
    return chosen


def get_backend(name: str | None = None) -> Backend:
    """Return the (cached) backend instance for ``name`` (see :func:`resolve_backend_name`)."""
    chosen = resolve_backend_name(name)
    if chosen in _INSTANCES:
        return _INSTANCES[chosen]
    entry = _REGISTRY[chosen]
    missing = [m for m in entry.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendError(
            f"Backend {chosen!r} needs {', '.join(missing)}, which is not installed. "
            f"Install it with: pip install 'diptych[{entry.extra}]'"
        )
    cls = getattr(importlib.import_module(entry.module), entry.attr)
    _INSTANCES[chosen] = cls()
    return _INSTANCES[chosen]
