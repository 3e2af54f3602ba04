"""JAX sharding: a ``jax.sharding.Mesh`` from a :class:`diptych.core.mesh.MeshConfig` and the placement of a
train state by the core's partition rules.

Parameters and AdamW moments get a ``NamedSharding`` each (by canonical parameter name, the rules of
:mod:`diptych.core.mesh`); batches are split over ``data x fsdp``. The train step is then the ordinary jitted
step of :mod:`diptych.backends.jax.train`: XLA's SPMD partitioner inserts the all-gathers, reduce-scatters and
all-reduces that the shardings imply (no hand-written collectives), and the outputs are pinned to the same
shardings so a state stays laid out the same way step after step. Multi-host runs call :func:`initialize`
(``jax.distributed.initialize``) first, then build the same mesh over every host's devices.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diptych.core import mesh as M
from diptych.core.mesh import MeshConfig, MeshError
from diptych.core.model_types import is_recurrent

JOB_ENV = ("DIPTYCH_COORDINATOR", "DIPTYCH_NUM_PROCESSES", "DIPTYCH_PROCESS_ID")
"""diptych's description of a multi-host JAX job: the coordinator's ``host:port``, the process count, this index."""
JAX_JOB_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
AUTO_DETECTED_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
"""Jobs JAX's own cluster detection describes (SLURM, Cloud TPU): ``jax.distributed.initialize()`` with no
arguments."""

_STARTED: list[tuple[int, int]] = []


def job_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """``jax.distributed.initialize`` arguments from ``DIPTYCH_COORDINATOR`` / ``DIPTYCH_NUM_PROCESSES`` /
    ``DIPTYCH_PROCESS_ID`` (or JAX's ``JAX_*`` names); ``{}`` for a job JAX detects itself; None for one host.
    All three or none: a half-described job fails here, not in a collective that never returns."""
    env = os.environ if env is None else env
    for names in (JOB_ENV, JAX_JOB_ENV):
        given = {n: env.get(n) for n in names if env.get(n) not in (None, "")}
        if not given:
            continue
        missing = [n for n in names if n not in given]
        if missing:
            raise MeshError(f"A multi-host JAX job needs {', '.join(names)} together; {', '.join(given)} set but "
                            f"{', '.join(missing)} missing (e.g. {names[0]}=host0:1234 {names[1]}=2 {names[2]}=0).")
        try:
            count, index = int(given[names[1]]), int(given[names[2]])
        except ValueError:
            raise MeshError(f"{names[1]} and {names[2]} must be integers, got {given[names[1]]!r} and "
                            f"{given[names[2]]!r}.") from None
        if count < 1 or not 0 <= index < count:
            raise MeshError(f"{names[2]}={index} must be in 0..{names[1]}-1 = {count - 1}.")
        return {"coordinator_address": given[names[0]], "num_processes": count, "process_id": index}
    if any(env.get(k) for k in AUTO_DETECTED_ENV):
        return {}
    return None


def initialize(env: Mapping[str, str] | None = None) -> bool:
    """Start multi-host JAX (``jax.distributed.initialize``) when the environment describes a multi-host job.

    Set ``DIPTYCH_COORDINATOR=host0:PORT``, ``DIPTYCH_NUM_PROCESSES`` and ``DIPTYCH_PROCESS_ID`` on every
    process (or JAX's ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``); Cloud TPU
    pods and SLURM are detected by JAX itself. On CPU the cross-process collectives go through gloo. Returns
    whether this process is part of a multi-host job. Call it before any other JAX call (``jax.devices()``
    then lists every host's devices); a single-host run needs nothing; calling it again is a no-op.
    """
    if _STARTED:
        return True
    job = job_from_env(env)
    if job is None:
        return False
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if job and (platforms in ("", "cpu") or platforms.startswith("cpu")):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**job)
    _STARTED.append((jax.process_index(), jax.process_count()))
    register_barrier()
    return True


def _process_info() -> tuple[int, int] | None:
    return (jax.process_index(), jax.process_count()) if _STARTED else None


def _job_barrier() -> None:
    from jax.experimental import multihost_utils

    initialize()
    multihost_utils.sync_global_devices("diptych")


def register_barrier() -> None:
    """Give the neutral core (:func:`diptych.core.mesh.barrier`, the trainers' process-0 run-directory writes)
    this job's process index and barrier."""
    M.register_process_info(_process_info, _job_barrier)


def global_array(a: Any, sharding: NamedSharding) -> jax.Array:
    """A host array (the same on every process) laid out on ``sharding``, which may span several hosts: each
    process places only the pieces its own devices hold."""
    a = np.asarray(a)
    if sharding.is_fully_addressable:
        return jax.device_put(a, sharding)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def to_host(x: Any) -> np.ndarray:
    """A (possibly multi-host) array as one numpy array on every process (a collective across processes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with axes ``("data", "fsdp", "tensor")`` over ``devices`` (default: every device of the job).

    The mesh must use exactly the given devices, so a wrong ``--mesh`` fails here, before anything compiles.
    """
    cfg = MeshConfig.coerce(cfg)
    devices = list(jax.devices() if devices is None else devices)
    M.check_devices(cfg, len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(cfg.shape), M.MESH_AXES)


def resolve_mesh(mesh: Any) -> Mesh | None:
    """The mesh a state goes on, or None for one device: a ``Mesh`` as is; ``"auto"`` every device on ``fsdp``;
    a ``MeshConfig`` / mapping / ``"fsdp=4"`` checked against the devices; None (and any one-device mesh): None."""
    if mesh is None or isinstance(mesh, Mesh):
        return mesh
    cfg = M.resolve(None if mesh == "auto" else mesh, jax.device_count())
    return None if cfg.is_single else make_mesh(cfg)


def mesh_config(mesh: Mesh) -> MeshConfig:
    """The :class:`MeshConfig` of a mesh built by :func:`make_mesh`."""
    return MeshConfig(**{a: int(mesh.shape[a]) for a in M.MESH_AXES})


def param_sharding(mesh: Mesh, name: str, shape: Sequence[int], *, recurrent: bool = False) -> NamedSharding:
    """Where parameter ``name`` lives: the core's rule for it on this mesh."""
    return NamedSharding(mesh, PartitionSpec(*M.mesh_axes(name, shape, mesh_config(mesh), recurrent=recurrent)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows split over ``data x fsdp``; every other dimension whole."""
    return NamedSharding(mesh, PartitionSpec(M.BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a micro-batch's arrays split by rows (every array's first dimension is the batch)."""
    cfg = mesh_config(mesh)
    out = {}
    for k, v in batch.items():
        a = np.asarray(v)
        if a.ndim == 0:
            out[k] = global_array(a, replicated(mesh))
            continue
        M.check_batch(cfg, a.shape[0], what=f"micro-batch ({k!r})")
        out[k] = global_array(a, batch_sharding(mesh, a.ndim))
    return out


# -- the train state --------------------------------------------------------------------------------
def _key(entry: Any) -> str:
    return str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry))))


def named_leaves(tree: Any) -> dict[str, Any]:
    """``{canonical name: leaf}`` for a params-shaped tree (model params by HF name, then the value head)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", ""))) for k in path
                if not isinstance(k, jax.tree_util.GetAttrKey)]
        if keys[0] == "model":
            if keys[1] == "params":  # a recurrent model keeps its HF-named Params in one dict, ``params``
                keys = keys[1:]
            out[".".join(keys[1:])] = leaf
        else:
            out[".".join(keys)] = leaf
    return out


def params_shardings(params: Any, mesh: Mesh, *, recurrent: bool) -> list[NamedSharding]:
    """One sharding per leaf of a params tree (``TrainState.params``), in flatten order."""
    leaves = named_leaves(params)
    return [param_sharding(mesh, n, np.shape(v), recurrent=recurrent) for n, v in leaves.items()]


def tree_shardings(params: Any, tree: Any, mesh: Mesh, *, recurrent: bool) -> list[NamedSharding]:
    """One sharding per leaf of ``tree`` (an optimizer state): a leaf whose path ends with a parameter's path
    (AdamW's ``mu`` / ``nu``) is laid out as that parameter; anything else (step counts, learning rate)
    is replicated."""
    by_path = {}
    for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                params_shardings(params, mesh, recurrent=recurrent)):
        by_path[tuple(_key(k) for k in path)] = (np.shape(leaf), sh)
    lengths = sorted({len(p) for p in by_path}, reverse=True)
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(_key(k) for k in path)
        found = None
        for n in lengths:
            hit = by_path.get(keys[-n:]) if len(keys) >= n else None
            if hit is not None and hit[0] == np.shape(leaf):
                found = hit[1]
                break
        out.append(found or replicated(mesh))
    return out


def place(tree: Any, shardings: Sequence[NamedSharding]) -> Any:
    """``tree`` with leaf ``i`` put on ``shardings[i]``."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if len(leaves) != len(shardings):
        raise MeshError(f"Internal: {len(leaves)} leaves but {len(shardings)} shardings.")
    return jax.tree_util.tree_unflatten(treedef, [_put(x, s) for x, s in zip(leaves, shardings)])


def _put(x: Any, sharding: NamedSharding) -> Any:
    """``x`` on ``sharding``; a multi-host sharding takes each process's own pieces of the host copy."""
    if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    return global_array(np.asarray(x), sharding)


def shard_state(state: Any, mesh: Mesh | MeshConfig) -> Any:
    """``state`` (a ``diptych.backends.jax.train.TrainState``) with its parameters and optimizer state placed
    on ``mesh`` by the partition rules, and the mesh recorded on it so that each train step splits its
    micro-batches over ``data x fsdp`` and keeps the layout. Checks the model against the mesh first."""
    if isinstance(mesh, MeshConfig):
        mesh = make_mesh(mesh)
    cfg = mesh_config(mesh)
    spec = state.spec
    M.check_all(cfg, backend="jax", n_devices=mesh.devices.size, spec=spec)
    rec = is_recurrent(spec)
    state.params = place(state.params, params_shardings(state.params, mesh, recurrent=rec))
    state.opt_state = place(state.opt_state, tree_shardings(state.params, state.opt_state, mesh, recurrent=rec))
    state.mesh = mesh
    state._merged = None
    return state


def state_shardings(state: Any) -> tuple[Any, Any]:
    """``(params shardings tree, opt_state shardings tree)`` of a sharded state, for ``jit`` ``out_shardings``."""
    rec = is_recurrent(state.spec)
    ps = params_shardings(state.params, state.mesh, recurrent=rec)
    os_ = tree_shardings(state.params, state.opt_state, state.mesh, recurrent=rec)
    return (jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state.params), ps),
            jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state.opt_state), os_))


# -- measuring ------------------------------------------------------------------------------------
def bytes_per_device(*trees: Any) -> dict[Any, int]:
    """Bytes each device holds for ``trees``, summed over the addressable shards actually stored there
    (what the layout really costs, not what the config promises)."""
    out: dict[Any, int] = {}
    for tree in trees:
        for leaf in jax.tree_util.tree_leaves(tree):
            if not isinstance(leaf, jax.Array):
                continue
            for shard in leaf.addressable_shards:
                out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def total_bytes(*trees: Any) -> int:
    """Logical bytes of ``trees`` (each array once, whatever its layout)."""
    return int(sum(leaf.nbytes for tree in trees for leaf in jax.tree_util.tree_leaves(tree)
                   if hasattr(leaf, "nbytes")))
