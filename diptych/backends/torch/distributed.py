"""torch distributed training: process group from ``torchrun``, FSDP2 / HSDP / tensor parallelism from the
core's mesh config and partition rules, and the sharded train step.

Layout of a :class:`diptych.core.mesh.MeshConfig` on ``data x fsdp x tensor`` processes (``tensor`` fastest):

- ``tensor > 1``: DTensor tensor parallelism (``parallelize_module``) of every decoder layer, with a
  column-wise plan for each ``nn.Linear`` whose output dimension the rules put on ``heads`` / ``kv_heads`` /
  ``mlp`` and a row-wise plan for each whose input dimension they put there; each rank then holds whole heads.
- ``data x fsdp > 1``: FSDP2 ``fully_shard`` per decoder layer (per prelude / coda block of a recurrent model)
  and on the root, on the 2-D ``(data, fsdp)`` mesh: sharded over ``fsdp``, replicated over ``data`` (HSDP;
  with ``fsdp=1`` that is plain data parallelism).

The step (:func:`train_step`) is :func:`diptych.backends.torch.train.train_step`'s algorithm with
``.backward()`` instead of ``autograd.grad`` (FSDP2 reduce-scatters in its backward hooks): each rank runs its
rows of every micro-batch, the engines sum the gradients, the denominators are summed across ranks, and each
term is divided once by its global denominator, so the update equals the one-device update.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from diptych.backends.torch import train as T
from diptych.core import mesh as M
from diptych.core import train_step as TS
from diptych.core.mesh import MeshConfig, MeshError
from diptych.core.model_types import is_recurrent
from diptych.core.optim import lr_at

CALL = "diptych_call"
"""The root method every computation on a sharded model goes through, so FSDP2's root hooks gather it."""


# -- process group --------------------------------------------------------------------------------
def init_process_group(backend: str | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: join the ``torchrun`` job (NCCL on GPU, gloo on CPU); one process without one."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    register_barrier()
    return dist.get_rank(), dist.get_world_size()


def _process_info() -> tuple[int, int] | None:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else None


def _job_barrier() -> None:
    init_process_group()  # the run directory is cleared before anything else has joined the job
    _barrier()


def register_barrier() -> None:
    """Give the neutral core (:func:`diptych.core.mesh.barrier`, the trainers' rank-0 run-directory writes) this
    job's rank and barrier."""
    M.register_process_info(_process_info, _job_barrier)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_rank0() -> bool:
    """Whether this process logs, draws progress bars and writes plots (only rank 0 does)."""
    return rank() == 0


def on_rank0(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` that runs only on rank 0 (returns None elsewhere): wrap loggers, progress bars, plotters."""
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if is_rank0() else None
    wrapped.__wrapped__ = fn  # type: ignore[attr-defined]
    wrapped.__doc__ = fn.__doc__
    return wrapped


@contextmanager
def rank0_output() -> Iterator[None]:
    """Silence stdout on every rank but 0 (stderr stays: errors of any rank are seen)."""
    if is_rank0():
        yield
        return
    saved = sys.stdout
    with open(os.devnull, "w") as null:
        sys.stdout = null
        try:
            yield
        finally:
            sys.stdout = saved


def device_mesh(cfg: MeshConfig, device_type: str | None = None) -> Any:
    """A 3-D ``DeviceMesh`` named ``("data", "fsdp", "tensor")`` over the job's processes (checked first)."""
    from torch.distributed.device_mesh import init_device_mesh

    M.check_backend(cfg, "torch")
    M.check_devices(cfg, world_size(), what="processes (torchrun --nproc-per-node)")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device_type, cfg.shape, mesh_dim_names=M.MESH_AXES)


# -- sharding a model ----------------------------------------------------------------------------
def _blocks(model: nn.Module) -> list[nn.Module]:
    """The FSDP units below the root: decoder layers, or a recurrent model's prelude and coda blocks (its core
    block runs r times per step and stays in the root unit, gathered once per step)."""
    if is_recurrent(model.spec):
        return [*model.transformer.prelude, *model.transformer.coda]
    return list(model.model.layers)


def tensor_plan(model: nn.Module) -> dict[str, Any]:
    """The DTensor plan of one decoder layer from the core's rules: ``{submodule: Colwise|RowwiseParallel}``."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    split = {"heads", "kv_heads", "mlp"}
    plan: dict[str, Any] = {}
    prefix = "model.layers.0."
    for name, mod in model.model.layers[0].named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        out_axis, in_axis = M.logical_axes(prefix + name + ".weight")
        if out_axis in split:
            plan[name] = ColwiseParallel()
        elif in_axis in split:
            plan[name] = RowwiseParallel()
    return plan


def shard_model(model: nn.Module, cfg: MeshConfig, mesh: Any = None, *, mixed_precision: str = "none") -> nn.Module:
    """Shard ``model`` in place over this job's processes (see the module docstring); returns it.

    The root's parameters (embeddings, final norm, head) stay gathered outside the backward (FSDP2's default
    for the root, kept by :func:`gather_root` after each step), so the backend's sampler and log-prob functions
    run on the sharded model unchanged; the decoder layers gather and free themselves one at a time.

    ``mixed_precision="bf16"``: FSDP2's ``MixedPrecisionPolicy`` (parameters gathered as bfloat16 for compute,
    gradients reduced in float32); the stored shards stay the float32 master weights AdamW updates, so the
    update is the one-device bf16 step's (bf16 compute, float32 master) within the bf16 tolerance.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from torch.distributed.tensor.parallel import parallelize_module

    M.check_all(cfg, backend="torch", n_devices=world_size(), spec=model.spec)
    if getattr(model, "dtype_name", getattr(model, "dtype", "float32")) != "float32":
        raise MeshError("Sharded torch training runs float32 weights; build the model in float32.")
    if mesh is None and not cfg.is_single:
        mesh = device_mesh(cfg)
    if cfg.tensor > 1:
        plan = tensor_plan(model)
        for layer in model.model.layers:
            parallelize_module(layer, mesh["tensor"], plan)
            # each rank now computes its own heads: the attention reshapes use the local counts
            layer.self_attn.num_heads //= cfg.tensor
            layer.self_attn.num_kv_heads //= cfg.tensor
    if mixed_precision not in ("none", "bf16"):
        raise MeshError(f"mixed_precision must be 'none' or 'bf16', got {mixed_precision!r}.")
    if mixed_precision == "bf16" and cfg.batch_shards == 1:
        raise MeshError("Sharded bf16 on torch runs through FSDP2's mixed precision, which needs data x fsdp > 1; a "
                        f"tensor-only mesh ({cfg}) trains float32 (optim.mixed_precision='none') or use fsdp >= 2.")
    if cfg.batch_shards > 1:
        dp = mesh["data", "fsdp"]
        kw: dict[str, Any] = {}
        if mixed_precision == "bf16":
            from torch.distributed.fsdp import MixedPrecisionPolicy

            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in _blocks(model):
            fully_shard(block, mesh=dp, **kw)
        fully_shard(model, mesh=dp, **kw)
    model.diptych_call = types.MethodType(lambda self, fn, *a, **k: fn(*a, **k), model)
    if cfg.batch_shards > 1:
        register_fsdp_forward_method(model, CALL)
        _warm_up(model)
        model.reshard()  # the optimizer is built over the sharded parameters; gather_root after that
    model.diptych_mesh = (cfg, mesh)
    model.diptych_mixed_precision = mixed_precision
    model.diptych_ops = sys.modules[__name__]  # train.py steps a sharded state through this module
    return model


def _warm_up(model: nn.Module) -> None:
    """One no-grad token through the root: FSDP2 sets itself up on the root's first forward and makes each unit's
    gathered-parameter tensors then; made here, outside ``inference_mode``, they stay ordinary tensors that a
    sampler running under ``inference_mode`` may fill and a later train step may fill again."""
    from diptych.backends.facade import model_module

    lib = model_module("diptych.backends.torch", model)
    one = np.zeros((1, 1), np.int64)
    depth = {"num_steps": 1, "num_grad_steps": None} if is_recurrent(model.spec) else {}
    with torch.no_grad():
        call(model, lib.hidden_states, model, one, **depth)


def gather_root(model: nn.Module) -> None:
    """Keep the root's parameters (embeddings, final norm, head) gathered between steps, so the backend's own
    sampler and log-prob functions run on a sharded model as they are (the decoder layers gather themselves)."""
    if isinstance(model, _fsdp_module()):
        model.unshard()


def _fsdp_module() -> type:
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def init_train_state(model: nn.Module, optim: Any, *, mesh: Any = None, **kw: Any) -> T.TrainState:
    """:func:`diptych.backends.torch.train.init_train_state` on ``mesh``: shard ``model`` over the ``torchrun``
    job first (:func:`shard_for_training`; None: one process), then build the optimizer over the shards."""
    if mesh is not None:
        model = shard_for_training(model, mesh, optim)
    if getattr(model, "diptych_mixed_precision", None) == "bf16":
        # the shards are the float32 master weights (FSDP2 casts to bf16 for compute): no bf16 rebuild
        state = T.init_train_state(model, dataclasses.replace(optim, mixed_precision="none"), **kw)
        state.optim = optim
        return state
    return T.init_train_state(model, optim, **kw)


def shard_for_training(model: nn.Module, mesh: Any, optim: Any = None) -> nn.Module:
    """What :func:`init_train_state` does first: join the ``torchrun`` job and shard ``model`` on
    ``mesh`` (``"auto"``: the whole job on ``fsdp``; a one-process mesh leaves the model as it is)."""
    init_process_group()
    cfg = M.resolve(None if mesh == "auto" else mesh, world_size(), what="processes (torchrun --nproc-per-node)")
    if cfg.is_single:
        return model
    return shard_model(model, cfg, mixed_precision=getattr(optim, "mixed_precision", None) or "none")


def is_sharded(state_or_model: Any) -> bool:
    """Whether a train state's model (or a model) was sharded by :func:`shard_model`."""
    model = state_or_model.model if isinstance(state_or_model, T.TrainState) else state_or_model
    return getattr(model, "diptych_mesh", None) is not None


def mesh_of(model: nn.Module) -> tuple[MeshConfig, Any]:
    found = getattr(model, "diptych_mesh", None)
    if found is None:
        raise MeshError("This model is not sharded; call diptych.backends.torch.distributed.shard_model first.")
    return found


def call(model: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with the sharded model's root gathered (through FSDP2's hooks)."""
    return getattr(model, CALL)(fn, *args, **kwargs)


def generate(model: nn.Module, prompts: Any, sampling: Any, **kwargs: Any) -> Any:
    """Generation on a sharded model: the backend's own sampler, run with the root gathered."""
    from diptych.backends.facade import model_module

    lib = model_module("diptych.backends.torch", model)
    gen = lib.generate if hasattr(lib, "generate") else __import__(
        "diptych.backends.torch.sampler", fromlist=["generate"]).generate
    cfg = mesh_of(model)[0] if is_sharded(model) else MeshConfig()
    if cfg.tensor == 1:
        return call(model, gen, model, prompts, sampling, **kwargs)
    # tensor parallel: each rank's attention holds its own heads, so its KV cache holds only those
    spec = model.spec
    model.spec = _LocalHeads(spec, cfg.tensor)
    try:
        return call(model, gen, model, prompts, sampling, **kwargs)
    finally:
        model.spec = spec


class _LocalHeads:
    """A decoder spec as one tensor-parallel rank sees it for its KV cache: its share of the KV heads (what
    ``model.init_cache`` sizes the cache by); everything else is the model's spec."""

    def __init__(self, spec: Any, tensor: int) -> None:
        self._spec = spec
        self.num_key_value_heads = spec.num_key_value_heads // tensor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._spec, name)


# -- the train step ----------------------------------------------------------------------------
def local_rows(mb: Mapping[str, np.ndarray], cfg: MeshConfig) -> dict[str, np.ndarray]:
    """This rank's rows of a micro-batch (``data x fsdp`` shards; tensor peers get the same rows)."""
    out = {}
    for k, v in mb.items():
        a = np.asarray(v)
        out[k] = a if a.ndim == 0 else a[M.batch_slice(a.shape[0], cfg, M.batch_shard_of(rank(), cfg))]
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _sq_norm(g: torch.Tensor) -> float:
    return float(_full(torch.sum(g.float() * g.float())))


def _all_sum(values: Sequence[float], cfg: MeshConfig) -> list[float]:
    """Sum per-rank scalars over the batch shards (tensor peers computed the same rows: counted once)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t)
    return [float(x) / cfg.tensor for x in t]


def train_step(state: T.TrainState, microbatches: Sequence[Mapping[str, np.ndarray]], loss: str | Mapping[str, float],
               loss_config: Any, *, temperature: float = 1.0) -> tuple[T.TrainState, dict[str, float]]:
    """One AdamW update of a sharded state from the global ``microbatches`` (every rank passes all of them).

    Returns the metrics of :func:`diptych.backends.torch.train.train_step`, reduced over ranks: ``loss``,
    ``grad_norm``, ``denominator``, ``tokens`` are global; per-loss metrics are averaged over the shards.
    """
    cfg, _ = mesh_of(state.model)
    plan = TS.prepare_step(microbatches, loss, loss_config, has_value_head=state.value_head is not None)
    for mb in microbatches:
        for k, v in mb.items():
            if np.ndim(v):
                M.check_batch(cfg, np.shape(v)[0], what=f"micro-batch ({k!r})")
    names = plan.names
    params = state.master  # the sharded parameters AdamW updates (the module shows gathered ones for the root)
    local = [local_rows(mb, cfg) for mb in microbatches]
    scale = float(cfg.batch_shards)  # FSDP2 averages gradients over its ranks; the step wants their sum
    totals = TS.StepTotals(plan)
    acc: list[list[torch.Tensor]] = []
    for i in range(len(names)):  # one backward per term, so each term's gradient sum stays separate
        for mb, outputs in zip(local, plan.outputs):
            outs, extra = call(state.model, _losses, state, mb, plan, outputs, temperature)
            (outs[i][0] * scale).backward()
            if i == 0:
                totals.add(mb, [o[0] for o in outs], [o[1] for o in outs], [o[2] for o in outs], extra, T._f)
        acc.append([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
        for p in params:
            p.grad = None
    _reduce_replicated(state, acc, cfg)
    totals.sums, totals.dens = _all_sum(totals.sums, cfg), _all_sum(totals.dens, cfg)
    totals.tokens = sum(TS.count_tokens(mb) for mb in microbatches)
    totals.loss_rows, totals.extra_rows = _gather_rows(totals.loss_rows), _gather_rows(totals.extra_rows)
    totals.close()
    lr = lr_at(state.step, state.optim)
    with torch.no_grad():
        grads = T._divide_once(plan.weights, totals.dens, acc)
        norm = math.sqrt(sum(_sq_norm(g) for g in grads))
        metrics = totals.report(state.step, norm, lr)
        if metrics["skipped"]:
            return state, metrics
        if state.optim.max_grad_norm > 0 and norm >= state.optim.max_grad_norm:
            grads = [g * (state.optim.max_grad_norm / norm) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
    gather_root(state.model)
    state.step += 1
    return state, metrics


def _reduce_replicated(state: T.TrainState, acc: list[list[torch.Tensor]], cfg: MeshConfig) -> None:
    """Sum the gradients of the parameters no engine shards (PPO's value head: ``[H] -> 1``, replicated on every
    rank) over the batch shards, as FSDP2 does for the rest. Each rank's gradient is its rows' sum times
    ``batch_shards`` (the scale FSDP2's averaging wants) and tensor peers computed the same rows, so the sum over
    all ranks is divided by ``batch_shards x tensor`` (the world size)."""
    if state.value_head is None or world_size() == 1:
        return
    head = {id(p) for p in state.value_head.parameters()}
    for grads in acc:
        for i, p in enumerate(state.master):
            if id(p) in head:
                g = grads[i].detach().clone()
                dist.all_reduce(g)
                grads[i] = g / world_size()


def _losses(state: T.TrainState, mb: Mapping[str, np.ndarray], plan: TS.StepPlan, outputs: frozenset[str],
            temperature: float) -> tuple[list[tuple[Any, Any, dict[str, Any]]], dict[str, Any]]:
    """Each term's ``(sum, denominator, metrics)`` of one micro-batch and its extra metrics (run in :func:`call`)."""
    quantities = T._model_quantities(state, mb, outputs, temperature)
    device = next(iter(quantities.values())).device
    constants = {k: torch.as_tensor(v, device=device) for k, v in TS.host_batch(mb, plan).items()
                 if k not in plan.int_keys}
    inputs = TS.loss_inputs(constants, quantities, plan.names, torch.Tensor.detach, outputs)
    return TS.run_losses(inputs, plan.names, plan.configs), TS.extra_metrics(inputs)


def _gather_rows(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    if world_size() == 1:
        return rows
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, rows)
    return [r for part in everyone for r in part]


# -- weights out ---------------------------------------------------------------------------------
def export_weights(state_or_model: Any) -> dict[str, np.ndarray]:
    """Full canonical float32 weights of a sharded model on every rank (a collective: every rank calls it)."""
    with torch.no_grad():
        if hasattr(state_or_model, "master"):  # a train state: its float32 shards (under bf16 the model computes
            named = [(n, p) for n, p in zip(state_or_model.names, state_or_model.master)  # in bfloat16)
                     if n not in T.VALUE_HEAD]
        else:
            named = list(state_or_model.named_parameters())
        # clone first: a numpy view would pin the gathered root's storage, which FSDP2 must free to reshard
        return {n: _full(p.detach()).float().cpu().clone().numpy() for n, p in named}


def export_optimizer(state: T.TrainState) -> dict[str, Any]:
    """AdamW moments by canonical name, gathered (the format of ``train.export_optimizer``; a collective)."""
    mu, nu, count = {}, {}, 0
    for name, p in zip(state.names, state.master):
        st = state.optimizer.state.get(p, {})
        if "exp_avg" in st:
            mu[name] = _full(st["exp_avg"]).float().cpu().numpy().copy()
            nu[name] = _full(st["exp_avg_sq"]).float().cpu().numpy().copy()
            count = int(float(_full(st["step"]) if isinstance(st["step"], torch.Tensor) else st["step"]))
        else:
            mu[name] = np.zeros(tuple(p.shape), np.float32)
            nu[name] = np.zeros(tuple(p.shape), np.float32)
    return {"count": count, "mu": mu, "nu": nu}


def local_bytes(state: T.TrainState) -> int:
    """Bytes this rank stores for parameters and AdamW moments (local DTensor shards, not logical sizes); the
    root's gathered copy held between steps (:func:`gather_root`) is a compute buffer and is not counted."""
    def nbytes(t: torch.Tensor) -> int:
        local = t.to_local() if hasattr(t, "to_local") else t
        return local.numel() * local.element_size()

    total = sum(nbytes(p) for p in state.master)
    for st in state.optimizer.state.values():
        total += sum(nbytes(v) for v in st.values() if isinstance(v, torch.Tensor) and v.ndim > 0)
    return total


# -- checkpoints -----------------------------------------------------------------------------------
DCP_DIR = "dcp"
"""The ``torch.distributed.checkpoint`` folder of a sharded checkpoint (one file per rank, plus its index)."""


def _barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _modules(state: T.TrainState) -> nn.Module:
    """What the checkpoint holds: the model, or with PPO's value head a container of both (keys ``model.*`` and
    ``value_head.*``), so its weights and AdamW state travel in the same sharded checkpoint."""
    if state.value_head is None:
        return state.model
    return nn.ModuleDict({"model": state.model, "value_head": state.value_head})


def _state_dicts(state: T.TrainState) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    modules = _modules(state)
    return {"model": get_model_state_dict(modules), "optim": get_optimizer_state_dict(modules, state.optimizer)}


def save(state: T.TrainState, path: str | os.PathLike, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write a sharded checkpoint: each rank its own shards of weights and AdamW state (``dcp/``), rank 0 the
    ``diptych.json`` metadata; atomic across ranks. Restore it on any mesh (or one process) with :func:`restore`."""
    import torch.distributed.checkpoint as dcp

    from diptych.core import checkpointing as ckpt

    path = Path(path)
    cfg = getattr(state.model, "diptych_mesh", (MeshConfig(), None))[0]
    with ckpt.job_atomic_dir(path) as tmp:  # rank 0 renames once every rank has written its shards
        dcp.save(_state_dicts(state), checkpoint_id=str(tmp / DCP_DIR))
        gather_root(state.model)  # taking the state dict resharded the root
        if is_rank0():
            ckpt.write_metadata(tmp, backend="torch", step=state.step, spec=state.model.spec, optim=state.optim,
                                extra={"value_head": state.value_head is not None,
                                       "kernels": getattr(state.model, "kernels", None),
                                       "sharded": True, "mesh": cfg.as_dict(), "seed": state.seed},
                                user=metadata)
    return path


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def restore(path: str | os.PathLike, mesh: MeshConfig | None = None) -> tuple[T.TrainState, dict[str, Any]]:
    """Load a sharded checkpoint onto ``mesh`` (default: one process, unsharded; ``"auto"``: the whole job on
    ``fsdp``): ``(state, metadata)``.

    The layout it was saved with does not matter: ``torch.distributed.checkpoint`` reads each rank's new
    shards from whatever files hold them (saved at fsdp=4, resumed at fsdp=2 or on one process).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from diptych.backends.facade import read_checkpoint
    from diptych.core import checkpointing as ckpt

    path = Path(path)
    meta, spec, optim, options = read_checkpoint(path, "torch")
    if mesh is not None:
        init_process_group()  # a resume restores before anything else has joined the torchrun job
    if not is_sharded_checkpoint(path):
        raise ckpt.CheckpointError(f"{path} has no {DCP_DIR}/ (not a sharded checkpoint); use "
                                   "diptych.backends.torch.checkpoint.restore.")
    zeros = {k: np.zeros(s, np.float32) for k, s in spec.param_shapes().items()}
    model = T._lib(spec).build(spec, zeros, device="cpu" if not torch.cuda.is_available() else None, **options)
    cfg = MeshConfig() if mesh is None else M.resolve(None if mesh == "auto" else mesh, world_size(),
                                                        what="processes (torchrun --nproc-per-node)")
    if not cfg.is_single:
        model = shard_model(model, cfg, mixed_precision=optim.mixed_precision)
    head = bool(meta.get("value_head"))
    # the checkpoint holds float32 weights and moments: load them into a float32 state first
    seed = int(meta.get("seed", 0))
    state = T.init_train_state(model, dataclasses.replace(optim, mixed_precision="none"), value_head=head, seed=seed)
    sd = _state_dicts(state)
    dcp.load(sd, checkpoint_id=str(path / DCP_DIR))
    modules = _modules(state)
    set_model_state_dict(modules, sd["model"])
    set_optimizer_state_dict(modules, state.optimizer, sd["optim"])
    gather_root(state.model)
    state.optim = optim
    if cfg.is_single and optim.mixed_precision == "bf16":  # one process: bf16 model, float32 master copy
        moments, value_head = T.export_optimizer(state), T.export_value_head(state)
        state = T.init_train_state(state.model, optim, value_head=head, seed=seed)
        T.load_optimizer(state, moments)
        if value_head is not None:
            T.load_weights(state, value_head)
    state.step = int(meta["step"])
    return state, meta["metadata"]


def save_hf(state: T.TrainState, path: str | os.PathLike) -> Path | None:
    """A Hugging Face folder (``config.json`` + safetensors) of a sharded state: gathered, written by rank 0."""
    from diptych.core.hf import save_hf_folder

    weights = export_weights(state)
    out = save_hf_folder(path, state.model.spec, weights) if is_rank0() else None
    _barrier()
    return out
