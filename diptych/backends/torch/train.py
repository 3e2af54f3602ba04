"""The torch half of a train step: ``torch.autograd.grad`` of each loss term's unreduced sum, ``AdamW``.

Checks, model-output dispatch, loss inputs, totals and metrics are backend-neutral
(:mod:`diptych.core.train_step`); here are the eager autograd calls per micro-batch and term, the
float32 gradient sums, the single division by each term's total denominator (DESIGN.md rule 3),
global-norm clipping and ``torch.optim.AdamW`` at the rate of :func:`diptych.core.optim.lr_at`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from diptych.backends.facade import base_weights, lora_config, model_dtype, model_module, set_remat
from diptych.backends.torch import kernels as kernels_mod
from diptych.backends.torch import model as model_lib
from diptych.core import train_step as TS
from diptych.core.lora import LoRAConfig
from diptych.core.optim import OptimConfig, lr_at
from diptych.core.spec import value_head_init

VALUE_HEAD = ("value_head.weight", "value_head.bias")


@dataclass
class TrainState:
    """Everything one training run changes: weights, AdamW state, step.

    ``model`` is the module to generate and score with (its weights always equal the
    trained ones, in the compute dtype). With ``mixed_precision="bf16"`` the model holds
    bfloat16 weights and ``master`` the float32 weights AdamW updates; otherwise
    ``master`` is the model's own parameters. ``step`` counts applied updates (skipped
    steps do not count) and indexes the learning-rate schedule. torch mutates the state in
    place, but callers should use the state ``train_step`` returns, as on JAX. ``seed`` (the run's) seeds LoRA
    dropout per ``(seed, step, micro-batch)`` (``diptych.backends.torch.lora.dropout_seed``).
    """

    model: nn.Module
    optim: OptimConfig
    optimizer: torch.optim.Optimizer
    names: list[str]
    master: list[torch.Tensor]
    value_head: nn.Linear | None = None
    step: int = 0
    seed: int = 0

    @property
    def spec(self) -> Any:
        return self.model.spec


def init_train_state(model: nn.Module, optim: OptimConfig, *, value_head: bool = False, seed: int = 0,
                     remat: str | None = None) -> TrainState:
    """Wrap a built model for training.

    With ``optim.mixed_precision="bf16"`` a float32 model is rebuilt in bfloat16 and its
    float32 weights become the master copy. The value head (``[H] -> 1``, float32, for PPO)
    is initialised in numpy from ``seed`` exactly as on JAX. A model already sharded by
    :func:`diptych.backends.torch.distributed.init_train_state` (which the backend calls when given a
    ``mesh``) gets its optimizer over the shards; ``remat`` (``none`` | ``layer``) sets activation checkpointing.
    """
    if not isinstance(optim, OptimConfig):
        raise TypeError(f"optim must be an OptimConfig, got {type(optim).__name__}.")
    if remat is not None:
        _set_remat(model, remat)
    lora = lora_config(__package__, model)
    if lora is not None and getattr(model, "diptych_mesh", None) is not None:
        raise ValueError("LoRA training runs on one process for now; drop the mesh (or torchrun) for a LoRA run.")
    named = _trainable(model)
    dtype = _model_dtype(model)
    if optim.mixed_precision == "bf16":
        master = [p.detach().float().clone().requires_grad_(True) for _, p in named]
        if dtype != "bfloat16":
            model = _rebuild(model, "bfloat16")
            named = _trainable(model)
    else:
        if dtype != "float32":
            raise ValueError(f"Training a {dtype} model needs optim.mixed_precision='bf16' (float32 master "
                             "weights); or build the model in float32.")
        master = [p for _, p in named]
    names = _canonical_names(model, [n for n, _ in named], lora)
    head = None
    if value_head:
        w, b = value_head_init(model.spec, seed)
        device = master[0].device
        head = nn.Linear(w.shape[1], 1).to(device)
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(w))
            head.bias.copy_(torch.from_numpy(b))
        names += list(VALUE_HEAD)
        master += [head.weight, head.bias]
    state = TrainState(model=model, optim=optim, optimizer=_adamw(master, optim), names=names, master=master,
                       value_head=head, seed=int(seed))
    if _sharded(state):
        _distributed(state).gather_root(model)  # so the sampler runs on it before the first step
    return state


_lib: Callable[[Any], ModuleType] = functools.partial(model_module, "diptych.backends.torch")
"""The model module for a spec or model: ``recurrent`` for recurrent-depth models, else ``model``."""
_model_dtype = model_dtype


def _set_remat(model: Any, remat: str) -> None:
    set_remat("diptych.backends.torch", model, remat)


def _distributed(state: TrainState) -> ModuleType:
    """The module that steps a sharded state: ``diptych.backends.torch.distributed``, which builds on this
    module, so the sharded model carries it (``diptych_ops``) instead of this module importing it."""
    return state.model.diptych_ops


def _sharded(state: TrainState) -> bool:
    return getattr(state.model, "diptych_mesh", None) is not None


def _rebuild(model: nn.Module, dtype: str) -> nn.Module:
    """The model in ``dtype`` on its device, keeping a decoder's kernels mode or a recurrent model's depth, and a
    LoRA model's adapters (the base rebuilt, the same adapters applied again)."""
    lib = _lib(model)
    device = lib.lm_head_weight(model).device
    lora = lora_config(__package__, model)
    if lib is model_lib:
        out = model_lib.build(model.spec, base_weights(__package__, model), dtype=dtype, kernels=model.kernels,
                              device=device)
    else:
        num_steps, num_grad_steps = getattr(model, "depth", (None, None))
        out = lib.build(model.spec, base_weights(__package__, model), dtype=dtype, num_steps=num_steps,
                        num_grad_steps=num_grad_steps).to(device)
    if lora is not None:
        out = _lora().apply_lora(out, lora, adapters=_lora().export_adapters(model))
    return out


def _lora() -> ModuleType:
    from diptych.backends.torch import lora

    return lora


def _trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The parameters the optimizer updates: all of them, or a LoRA model's adapters (its base is frozen)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _canonical_names(model: nn.Module, names: list[str], lora: LoRAConfig | None) -> list[str]:
    """Trained parameters by canonical name: HF names, and a LoRA model's adapters by their PEFT names
    (``{module}.lora_A.weight``), so optimizer moments and gradients compare across backends by name."""
    if lora is None:
        return names
    if not names:
        raise ValueError("This LoRA model has no trainable adapter (every parameter is frozen).")
    canonical = set(_lora().export_adapters(model))
    out = []
    for n in names:
        for part in ("lora_A", "lora_B"):
            if f".{part}" in n:
                n = f"{n.split(f'.{part}')[0]}.{part}.weight"
        out.append(n)
    return out if set(out) == canonical and len(out) == len(canonical) else names


def _adamw(params: list[torch.Tensor], optim: OptimConfig) -> torch.optim.AdamW:
    decay = [p for p in params if optim.decay_1d or p.ndim >= 2]
    no_decay = [p for p in params if not (optim.decay_1d or p.ndim >= 2)]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr_at(0, optim), betas=optim.betas, eps=optim.eps)


# -- the step -----------------------------------------------------------------------------------
def train_step(state: TrainState, microbatches: Sequence[Mapping[str, np.ndarray]], loss: str | Mapping[str, float],
               loss_config: Any, *, temperature: float = 1.0) -> tuple[TrainState, dict[str, float]]:
    """:meth:`diptych.core.backend.Backend.train_step` on torch: updates ``state`` in place and returns it.

    Clipping scales the divided gradient before ``AdamW.step``; under bf16 the updated float32 master
    weights are copied back into the model. Metrics: :func:`diptych.core.train_step.step_metrics`. A sharded
    state takes :func:`diptych.backends.torch.distributed.train_step` (the same update, reduced over ranks).
    """
    if _sharded(state):
        return _distributed(state).train_step(state, microbatches, loss, loss_config, temperature=temperature)
    params, acc, totals = _accumulate(state, microbatches, loss, loss_config, temperature)
    lr = lr_at(state.step, state.optim)
    with torch.no_grad():
        grads = _divide_once(totals.plan.weights, totals.dens, acc)
        norm = math.sqrt(sum(float(torch.sum(g * g)) for g in grads))
        metrics = totals.report(state.step, norm, lr)
        if metrics["skipped"]:
            return state, metrics
        if state.optim.max_grad_norm > 0 and norm >= state.optim.max_grad_norm:
            grads = [g * (state.optim.max_grad_norm / norm) for g in grads]
        for p, g in zip(state.master, grads):
            p.grad = g.to(p.dtype)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        if state.optim.mixed_precision == "bf16":
            for (_, p), m in zip(_trainable(state.model), state.master):
                p.copy_(m)
        for p in params:
            p.grad = None
    state.step += 1
    return state, metrics


def gradients(state: TrainState, microbatches: Sequence[Mapping[str, np.ndarray]], loss: str | Mapping[str, float],
              loss_config: Any, *, temperature: float = 1.0) -> tuple[dict[str, np.ndarray], float]:
    """:meth:`diptych.core.backend.Backend.gradients` on torch: the divided gradient of each master weight."""
    if _sharded(state):
        raise ValueError("gradients() runs on one process; compare sharded runs by their weights after "
                         "train_step instead.")
    _, acc, totals = _accumulate(state, microbatches, loss, loss_config, temperature)
    with torch.no_grad():
        grads = _divide_once(totals.plan.weights, totals.dens, acc)
    return {name: g.cpu().numpy() for name, g in zip(state.names, grads)}, totals.loss


def _divide_once(weights: Sequence[float], dens: Sequence[float], acc: Sequence[list[torch.Tensor]],
                 ) -> list[torch.Tensor]:
    """Each master weight's gradient: every term's accumulated sum times its weight over its total denominator."""
    return [sum(w / d * a[i] for w, d, a in zip(weights, dens, acc)) for i in range(len(acc[0]))]


def _accumulate(state: TrainState, microbatches: Sequence[Mapping[str, np.ndarray]], loss: str | Mapping[str, float],
                loss_config: Any, temperature: float) -> tuple[list[torch.Tensor], list[list[torch.Tensor]],
                                                               TS.StepTotals]:
    """The module parameters, per-term float32 gradient sums of the unreduced losses, and the totals."""
    plan = TS.prepare_step(microbatches, loss, loss_config, has_value_head=state.value_head is not None)
    names = plan.names
    params = [p for _, p in _trainable(state.model)] + list(state.value_head.parameters() if state.value_head else ())
    acc = [[torch.zeros_like(m, dtype=torch.float32) for m in state.master] for _ in names]
    totals = TS.StepTotals(plan)
    device = state.master[0].device
    drops = lora_config(__package__, state.model) is not None
    for j, (mb, outputs) in enumerate(zip(microbatches, plan.outputs)):
        dropout = (_lora().training_dropout(state.model, _lora().dropout_seed(state.seed, state.step, j)) if drops
                   else contextlib.nullcontext())
        with dropout:  # forward and backward: a remat layer's recomputation must draw the same masks
            quantities = _model_quantities(state, mb, outputs, temperature)
            constants = {k: torch.as_tensor(v, device=device) for k, v in TS.host_batch(mb, plan).items()
                         if k not in plan.int_keys}
            inputs = TS.loss_inputs(constants, quantities, names, torch.Tensor.detach, outputs)
            outs = TS.run_losses(inputs, names, plan.configs)
            for i, (s, _, _) in enumerate(outs):
                grads = torch.autograd.grad(s, params, retain_graph=i + 1 < len(names), allow_unused=True)
                for a, g in zip(acc[i], grads):
                    if g is not None:
                        a.add_(g.float())
        totals.add(mb, [o[0] for o in outs], [o[1] for o in outs], [o[2] for o in outs], TS.extra_metrics(inputs),
                   _f)
    return params, acc, totals.close()


def _model_quantities(state: TrainState, mb: Mapping[str, np.ndarray], outputs: frozenset[str],
                      temperature: float) -> dict[str, torch.Tensor]:
    """The declared differentiable outputs (log-probs, entropy, values) from this model's torch primitives.

    A recurrent model runs at the depth last given to ``set_depth(state.model, r, k)``: the first
    r - k iterations without gradient (truncated backprop).
    """
    model = state.model
    lib = _lib(model)
    weight = lib.lm_head_weight(model)

    def fused(hidden: torch.Tensor, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
        targets = torch.as_tensor(np.asarray(targets), device=hidden.device, dtype=torch.long)
        return logprobs_and_entropy(hidden, weight, targets, temperature, kernels=getattr(model, "kernels", "auto"))

    return TS.model_outputs(
        outputs, mb,
        logprobs=lambda tok, am, y: lib.logprobs(model, tok, am, y, temperature),
        hidden_states=lambda tok, am: lib.hidden_states(model, tok, am),
        logprobs_and_entropy=fused,
        values=lambda h: state.value_head(h.float())[..., 0],
    )


def logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                         kernels: str = "auto", chunk_tokens: int = model_lib.LOGPROB_CHUNK_TOKENS,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 target log-probs and entropy in one ``selective_logprobs`` call (chunked / Triton never hold the
    ``[tokens, V]`` logits); the torch twin of ``diptych.backends.jax.train.logprobs_and_entropy``."""
    return kernels_mod.selective_logprobs(hidden, weight, targets, temperature, kernels=kernels,
                                          chunk_size=chunk_tokens)


def _f(x: Any) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def values(state: TrainState, tokens: Any, attention_mask: Any) -> torch.Tensor:
    """Value-head predictions ``[B, T - 1]`` (float32, no gradient) aligned with the loss layout.

    Position ``t`` is the value of the prefix ``tokens[:, : t + 1]`` (the state before
    target ``tokens[:, t + 1]``), what PPO's GAE needs as ``old_values``.
    """
    if state.value_head is None:
        raise ValueError("This train state has no value head: init_train_state(model, optim, value_head=True).")
    tokens, attention_mask = np.asarray(tokens), np.asarray(attention_mask)
    with torch.no_grad():
        hidden = _lib(state.model).hidden_states(state.model, tokens[:, :-1], attention_mask[:, :-1])
        return state.value_head(hidden.float())[..., 0]


# -- weights in and out -------------------------------------------------------------------------
def export_weights(state: TrainState) -> dict[str, np.ndarray]:
    """Canonical float32 HF-named weights of the policy (the master copy under bf16; no value head).

    A sharded state is gathered (a collective: every rank calls it).
    """
    if _sharded(state):
        return _distributed(state).export_weights(state)
    trained = {n: m.detach().float().cpu().numpy().copy() for n, m in zip(state.names, state.master)
               if n not in VALUE_HEAD}
    lora = lora_config(__package__, state.model)
    if lora is None:
        return trained
    from diptych.core.lora import merge_weights

    return merge_weights(base_weights(__package__, state.model), export_adapters(state), lora)


def export_adapters(state: TrainState) -> dict[str, np.ndarray]:
    """A LoRA state's adapters by canonical name, float32 (the master copy under bf16)."""
    adapters = _lora().export_adapters(state.model)
    if state.optim.mixed_precision != "bf16":
        return adapters
    by_name = dict(zip(state.names, state.master))
    return {n: by_name[n].detach().float().cpu().numpy().copy() if n in by_name else a for n, a in adapters.items()}


def export_value_head(state: TrainState) -> dict[str, np.ndarray] | None:
    if state.value_head is None:
        return None
    return {"value_head.weight": state.value_head.weight.detach().float().cpu().numpy().copy(),
            "value_head.bias": state.value_head.bias.detach().float().cpu().numpy().copy()}


def export_optimizer(state: TrainState) -> dict[str, Any]:
    """AdamW moments by canonical name, backend-neutral: ``{"count", "mu": {...}, "nu": {...}}``."""
    if _sharded(state):
        return _distributed(state).export_optimizer(state)
    mu, nu, count = {}, {}, 0
    for name, p in zip(state.names, state.master):
        st = state.optimizer.state.get(p, {})
        if "exp_avg" in st:
            mu[name] = st["exp_avg"].detach().float().cpu().numpy().copy()
            nu[name] = st["exp_avg_sq"].detach().float().cpu().numpy().copy()
            count = int(float(st["step"]))
        else:
            mu[name] = np.zeros(tuple(p.shape), np.float32)
            nu[name] = np.zeros(tuple(p.shape), np.float32)
    return {"count": count, "mu": mu, "nu": nu}


def load_optimizer(state: TrainState, exported: Mapping[str, Any]) -> TrainState:
    """Install moments from :func:`export_optimizer` (of either backend) into ``state``."""
    count = int(exported["count"])
    if count == 0:
        return state
    for name, p in zip(state.names, state.master):
        if name not in exported["mu"]:
            raise KeyError(f"Optimizer state has no moments for parameter {name}.")
        state.optimizer.state[p] = {
            "step": torch.tensor(float(count)),
            "exp_avg": torch.as_tensor(np.asarray(exported["mu"][name]), device=p.device).to(p.dtype).clone(),
            "exp_avg_sq": torch.as_tensor(np.asarray(exported["nu"][name]), device=p.device).to(p.dtype).clone(),
        }
    return state


def load_weights(state: TrainState, weights: Mapping[str, np.ndarray]) -> TrainState:
    """Overwrite the trained weights (and value head, when given) from canonical numpy arrays."""
    with torch.no_grad():
        for name, m in zip(state.names, state.master):
            if name in weights:
                m.copy_(torch.as_tensor(np.asarray(weights[name], dtype=np.float32)))
        if state.optim.mixed_precision == "bf16":
            for (_, p), m in zip(_trainable(state.model), state.master):
                p.copy_(m)
    return state
