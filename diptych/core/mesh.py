"""One mesh config and one set of partition rules for both backends.

A run is laid out on a device mesh with three named axes: ``data`` (replicas), ``fsdp`` (parameters,
gradients and optimizer state sharded, batch split) and ``tensor`` (attention heads and MLP columns split
inside each layer). The batch is split over ``data x fsdp``. Which parameter dimension goes to which mesh axis
is written here once, by canonical (Hugging Face) parameter name, in two steps as MaxText and Tunix do it:
name -> logical axes (``vocab``, ``embed``, ``heads``, ``kv_heads``, ``mlp``), then logical axis -> mesh axis.
The JAX backend turns the result into ``NamedSharding``s; the torch backend into FSDP2 / tensor-parallel plans.
Every check here runs before any compute, so a bad layout fails in one line instead of inside a collective.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from diptych.core.model_types import is_recurrent

MESH_AXES = ("data", "fsdp", "tensor")
"""The mesh axes, outermost first (devices are laid out in this order: ``tensor`` neighbours are adjacent)."""

LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "mlp")

LOGICAL_TO_MESH: dict[str, str | None] = {"vocab": "tensor", "embed": "fsdp", "heads": "tensor",
                                          "kv_heads": "tensor", "mlp": "tensor"}
"""Logical axis -> mesh axis: the model dimension is sharded for FSDP, heads / MLP / vocab for tensor parallelism."""

BATCH_AXES = ("data", "fsdp")
"""Mesh axes the batch dimension is split over."""


class MeshError(ValueError):
    """A mesh layout that cannot run, with what was wrong and how to fix it."""


@dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; their product is the number of devices (processes on torch) a run uses."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        for axis in MESH_AXES:
            v = getattr(self, axis)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MeshError(f"mesh.{axis} must be an integer >= 1, got {v!r}.")

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    @property
    def batch_shards(self) -> int:
        """How many pieces the batch is cut into (``data x fsdp``); tensor-parallel peers share a piece."""
        return self.data * self.fsdp

    @property
    def is_single(self) -> bool:
        return self.size == 1

    def as_dict(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}

    def __str__(self) -> str:
        return ",".join(f"{a}={getattr(self, a)}" for a in MESH_AXES)

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """``"fsdp=4,tensor=2"`` (the ``--mesh`` option); omitted axes are 1, ``""`` is one device."""
        sizes: dict[str, int] = {}
        for part in (p.strip() for p in str(text).split(",")):
            if not part:
                continue
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in MESH_AXES:
                raise MeshError(f"Bad mesh entry {part!r}: write axis=size with axis one of {', '.join(MESH_AXES)}, "
                                "e.g. --mesh fsdp=4,tensor=2.")
            if key in sizes:
                raise MeshError(f"Mesh axis {key!r} given twice in {text!r}.")
            try:
                sizes[key] = int(value)
            except ValueError:
                raise MeshError(f"Mesh axis {key} needs an integer size, got {value.strip()!r}.") from None
        return cls(**sizes)

    @classmethod
    def coerce(cls, value: Any) -> MeshConfig:
        """A ``MeshConfig`` from a config value: None, a mapping (``mesh: {fsdp: 4}``), a string or a MeshConfig."""
        if value is None:
            return cls()
        if isinstance(value, MeshConfig):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(MESH_AXES))
            if unknown:
                raise MeshError(f"Unknown mesh axes {unknown}; the axes are {', '.join(MESH_AXES)}.")
            return cls(**{k: value[k] for k in value})
        raise MeshError(f"mesh must be a mapping like {{fsdp: 4}} or a string like 'fsdp=4', got {value!r}.")


def resolve(value: Any, n_devices: int, *, what: str = "devices") -> MeshConfig:
    """The mesh a run uses: ``None`` (no mesh configured) is every device on the ``fsdp`` axis, so a plain run
    uses all local devices (JAX) or the whole ``torchrun`` job; anything else must match the device count."""
    if value is None:
        return MeshConfig(fsdp=max(int(n_devices), 1))
    mesh = MeshConfig.coerce(value)
    check_devices(mesh, n_devices, what=what)
    return mesh


PROCESS_ENV = (("RANK", "WORLD_SIZE"), ("DIPTYCH_PROCESS_ID", "DIPTYCH_NUM_PROCESSES"),
               ("JAX_PROCESS_ID", "JAX_NUM_PROCESSES"))
"""Where a process learns its index and the job's process count: ``torchrun``'s variables, diptych's own
(multi-host JAX, :func:`diptych.backends.jax.sharding.initialize`), JAX's."""

_PROCESS_INFO: list[Callable[[], tuple[int, int]]] = []
_BARRIER: list[Callable[[], None]] = []
_BARRIER_PROVIDERS = (("RANK", "diptych.backends.torch.distributed"),
                      ("DIPTYCH_PROCESS_ID", "diptych.backends.jax.sharding"),
                      ("JAX_PROCESS_ID", "diptych.backends.jax.sharding"))
"""Which backend module provides the barrier of a job described by which variable (imported on first use only,
the way :mod:`diptych.core.backend` imports a backend by name: the core itself never imports a framework)."""


def register_process_info(info: Callable[[], tuple[int, int]], barrier: Callable[[], None] | None = None) -> None:
    """A backend's ``() -> (process index, process count)`` and its barrier, once it has joined a job (the
    environment may not say: SLURM or Cloud TPU jobs that JAX detects itself)."""
    _PROCESS_INFO[:] = [info]
    if barrier is not None:
        _BARRIER[:] = [barrier]


def process_info() -> tuple[int, int]:
    """``(index, count)`` of this process in its job: a registered backend's answer, else the environment
    (:data:`PROCESS_ENV`), else ``(0, 1)``."""
    import os

    for info in _PROCESS_INFO:
        found = info()
        if found is not None:
            return found
    for rank_var, size_var in PROCESS_ENV:
        rank = os.environ.get(rank_var)
        if rank not in (None, ""):
            try:
                return int(rank), int(os.environ.get(size_var) or 1)
            except ValueError:
                raise MeshError(f"${rank_var}={rank!r} / ${size_var}={os.environ.get(size_var)!r}: both must be "
                                "integers.") from None
    return 0, 1


def process_index() -> int:
    return process_info()[0]


def process_count() -> int:
    return process_info()[1]


def is_main_process() -> bool:
    """Whether this process logs, draws progress bars, writes plots and clears or writes the run directory:
    rank 0 of a ``torchrun`` job, process 0 of a multi-host JAX job, or a plain single process. Read without
    importing a framework (:func:`process_info`), so the neutral trainers can ask."""
    return process_index() == 0


def barrier() -> None:
    """Wait until every process of the job gets here (a no-op for one process). The backend's own collective
    (``torch.distributed.barrier``, JAX's ``sync_global_devices``): the one registered by the backend that
    joined the job, else the backend the environment names, imported now."""
    import importlib
    import os

    if process_count() <= 1:
        return
    if not _BARRIER:
        for var, module in _BARRIER_PROVIDERS:
            if os.environ.get(var) not in (None, ""):
                importlib.import_module(module).register_barrier()
                break
    if not _BARRIER:
        raise MeshError(f"This process is one of {process_count()} but no backend provides a barrier; start the "
                        "job with torchrun (torch) or set DIPTYCH_COORDINATOR / DIPTYCH_NUM_PROCESSES / "
                        "DIPTYCH_PROCESS_ID (jax).")
    _BARRIER[0]()


def on_main_process(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on process 0 only, then hold every process at a :func:`barrier` until it is done: the run
    directory is cleared and written by one process, and the others never see it half-done. Every process of
    the job must call it (it is a collective)."""
    result = None
    try:
        if is_main_process():
            result = fn()
    finally:
        barrier()
    return result


REMAT = ("none", "layer")
"""Activation checkpointing: ``layer`` recomputes each decoder layer (and each recurrent core iteration) in the
backward instead of storing its activations."""


def check_remat(remat: Any) -> str:
    if remat not in REMAT:
        raise MeshError(f"remat must be one of {', '.join(REMAT)}, got {remat!r}.")
    return remat


# -- partition rules ------------------------------------------------------------------------------
_DECODER_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"model\.embed_tokens\.weight", ("vocab", "embed")),
    (r"lm_head\.weight", ("vocab", "embed")),
    (r"model\.layers\.\d+\.self_attn\.q_proj\.weight", ("heads", "embed")),
    (r"model\.layers\.\d+\.self_attn\.q_proj\.bias", ("heads",)),
    (r"model\.layers\.\d+\.self_attn\.[kv]_proj\.weight", ("kv_heads", "embed")),
    (r"model\.layers\.\d+\.self_attn\.[kv]_proj\.bias", ("kv_heads",)),
    (r"model\.layers\.\d+\.self_attn\.o_proj\.weight", ("embed", "heads")),
    (r"model\.layers\.\d+\.self_attn\.[qk]_norm\.weight", (None,)),
    (r"model\.layers\.\d+\.(input|post_attention)_layernorm\.weight", ("embed",)),
    (r"model\.layers\.\d+\.mlp\.(gate|up)_proj\.weight", ("mlp", "embed")),
    (r"model\.layers\.\d+\.mlp\.down_proj\.weight", ("embed", "mlp")),
    (r"model\.norm\.weight", ("embed",)),
)
"""Llama / Qwen2 / Qwen3 (one layout: Qwen2 adds q/k/v biases, Qwen3 the per-head q/k norms)."""

_BLOCK = r"transformer\.(prelude|core_block|coda)\.\d+\."
_RECURRENT_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"transformer\.wte\.weight", ("vocab", "embed")),
    (r"lm_head\.weight", ("vocab", "embed")),
    (r"transformer\.adapter\.weight", ("embed", None)),
    (r"transformer\.adapter\.bias", ("embed",)),
    # Wqkv and fc are fused ([q; k; v] and [gate; up]): a head split would cut across the fused parts, so only
    # their model dimension is sharded; the projections after them split over heads / mlp.
    (_BLOCK + r"attn\.Wqkv\.weight", (None, "embed")),
    (_BLOCK + r"attn\.qk_bias", (None, None, None, None)),
    (_BLOCK + r"attn\.proj\.weight", ("embed", "heads")),
    (_BLOCK + r"mlp\.fc\.weight", (None, "embed")),
    (_BLOCK + r"mlp\.proj\.weight", ("embed", "mlp")),
    (_BLOCK + r"norm_[1-4]\.weight", ("embed",)),
    (r"transformer\.ln_f\.weight", ("embed",)),
)
"""Huginn (``huginn_raven``), names of ``diptych.core.recurrent_spec.RecurrentSpec.param_shapes``."""

_COMMON_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"value_head\.weight", (None, "embed")),
    (r"value_head\.bias", (None,)),
)

_COMPILED = {family: [(re.compile(p + r"\Z"), axes) for p, axes in rules + _COMMON_RULES]
             for family, rules in (("decoder", _DECODER_RULES), ("recurrent", _RECURRENT_RULES))}


def logical_axes(name: str, *, recurrent: bool = False) -> tuple[str | None, ...]:
    """The logical axis of each dimension of parameter ``name`` (None: never sharded)."""
    for pattern, axes in _COMPILED["recurrent" if recurrent else "decoder"]:
        if pattern.match(name):
            return axes
    family = "recurrent-depth (Huginn)" if recurrent else "Llama / Qwen2 / Qwen3"
    raise MeshError(f"No partition rule for parameter {name!r} of a {family} model; add one to "
                    "diptych.core.mesh (_DECODER_RULES or _RECURRENT_RULES).")


def mesh_axes(name: str, shape: Sequence[int], mesh: MeshConfig, *, recurrent: bool = False,
              ) -> tuple[str | None, ...]:
    """The mesh axis of each dimension of ``name`` (a ``PartitionSpec``'s entries).

    An axis of size 1 is dropped, and so is one that does not divide its dimension (that dimension is then
    replicated: correct, only less memory saved; :func:`check_model` refuses the cases that matter).
    """
    axes = logical_axes(name, recurrent=recurrent)
    if len(axes) != len(shape):
        raise MeshError(f"Partition rule for {name!r} has {len(axes)} dimensions, the parameter has shape "
                        f"{tuple(shape)}.")
    out: list[str | None] = []
    for dim, logical in zip(shape, axes):
        axis = LOGICAL_TO_MESH.get(logical) if logical else None
        size = getattr(mesh, axis) if axis else 1
        out.append(axis if axis and size > 1 and dim % size == 0 else None)
    return tuple(out)


def partition_rules(shapes: Mapping[str, Sequence[int]], mesh: MeshConfig, *, recurrent: bool = False,
                    ) -> dict[str, tuple[str | None, ...]]:
    """``{name: mesh axes}`` for every parameter of a spec (``spec.param_shapes()``)."""
    return {n: mesh_axes(n, s, mesh, recurrent=recurrent) for n, s in shapes.items()}


def spec_rules(spec: Any, mesh: MeshConfig, *, value_head: bool = False) -> dict[str, tuple[str | None, ...]]:
    """:func:`partition_rules` of a model spec (plus PPO's value head when asked)."""
    shapes = dict(spec.param_shapes())
    if value_head:
        shapes.update({"value_head.weight": (1, spec.hidden_size), "value_head.bias": (1,)})
    return partition_rules(shapes, mesh, recurrent=is_recurrent(spec))


# -- checks, all before any compute ---------------------------------------------------------------
BACKEND_AXES: dict[str, frozenset[str]] = {"jax": frozenset(MESH_AXES), "torch": frozenset(MESH_AXES)}
"""The mesh axes each backend serves (torch's tensor axis: decoders only, see :func:`check_backend`)."""


def check_devices(mesh: MeshConfig, n_devices: int, *, what: str = "devices") -> None:
    """The mesh must use exactly the devices (JAX) or processes (torch) the run has."""
    if mesh.size != n_devices:
        raise MeshError(f"Mesh {mesh} has {mesh.size} devices but the run has {n_devices} {what}; make "
                        f"data x fsdp x tensor = {n_devices} (e.g. --mesh fsdp={n_devices}).")


def check_model(mesh: MeshConfig, spec: Any) -> None:
    """Heads and KV heads must split evenly over ``tensor`` (each device owns whole heads)."""
    if mesh.tensor == 1:
        return
    heads = spec.num_attention_heads
    kv = getattr(spec, "num_key_value_heads", None) or heads
    for what, n in (("num_attention_heads", heads), ("num_key_value_heads", kv)):
        if n % mesh.tensor:
            raise MeshError(f"{what} ({n}) is not divisible by mesh tensor={mesh.tensor}; pick a tensor size that "
                            f"divides {n}.")
    mlp = getattr(spec, "intermediate_size", None)
    if mlp and mlp % mesh.tensor:
        raise MeshError(f"intermediate_size ({mlp}) is not divisible by mesh tensor={mesh.tensor}.")


def check_batch(mesh: MeshConfig, batch_size: int, *, what: str = "batch") -> None:
    """Each ``data x fsdp`` shard gets the same number of rows."""
    if batch_size % mesh.batch_shards:
        raise MeshError(f"The {what} has {batch_size} rows, not divisible by data x fsdp = {mesh.batch_shards} "
                        f"(mesh {mesh}); use a multiple of {mesh.batch_shards} rows per micro-batch.")


def check_backend(mesh: MeshConfig, backend: str, spec: Any = None) -> None:
    """Refuse an axis the backend cannot serve for this model."""
    served = BACKEND_AXES.get(backend)
    if served is None:
        raise MeshError(f"Unknown backend {backend!r} for a mesh; use one of {', '.join(BACKEND_AXES)}.")
    for axis in MESH_AXES:
        if getattr(mesh, axis) > 1 and axis not in served:
            raise MeshError(f"The {backend} backend cannot shard over the {axis} axis; set {axis}=1.")
    if backend == "torch" and mesh.tensor > 1 and spec is not None and is_recurrent(spec):
        raise MeshError("The torch backend has no tensor-parallel plan for recurrent-depth models (fused Wqkv); "
                        "use tensor=1 with fsdp / data, or the jax backend.")


def check_all(mesh: MeshConfig, *, backend: str, n_devices: int, spec: Any = None,
              batch_sizes: Sequence[int] = ()) -> None:
    """Every check a launch runs before building anything on devices."""
    check_backend(mesh, backend, spec)
    check_devices(mesh, n_devices, what="devices" if backend == "jax" else "processes")
    if spec is not None:
        check_model(mesh, spec)
    for b in batch_sizes:
        check_batch(mesh, b)


def batch_slice(batch_size: int, mesh: MeshConfig, shard: int) -> slice:
    """The rows of batch shard ``shard`` (``data_index * fsdp + fsdp_index``): contiguous, in order."""
    check_batch(mesh, batch_size)
    per = batch_size // mesh.batch_shards
    return slice(shard * per, (shard + 1) * per)


def coords(rank: int, mesh: MeshConfig) -> dict[str, int]:
    """``{axis: index}`` of a rank (device) laid out in :data:`MESH_AXES` order, ``tensor`` fastest."""
    if not 0 <= rank < mesh.size:
        raise MeshError(f"rank {rank} is outside mesh {mesh} of {mesh.size} devices.")
    d, rest = divmod(rank, mesh.fsdp * mesh.tensor)
    f, t = divmod(rest, mesh.tensor)
    return {"data": d, "fsdp": f, "tensor": t}


def batch_shard_of(rank: int, mesh: MeshConfig) -> int:
    """Which batch shard a rank computes (tensor-parallel peers compute the same one)."""
    c = coords(rank, mesh)
    return c["data"] * mesh.fsdp + c["fsdp"]
