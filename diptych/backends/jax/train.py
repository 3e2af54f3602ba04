"""The JAX half of a train step: ``jax.vjp`` of each loss term's unreduced sum, ``optax.adamw``.

What a step checks, computes and reports is backend-neutral and lives in :mod:`diptych.core.train_step`;
this module holds only what JAX does differently: one jitted micro-batch function (per loss, config,
temperature, dtype, depth and batch structure) returning sums, denominators and the accumulated
float32 gradient trees, and one jitted ``_apply`` that divides each term once by its total
denominator (DESIGN.md rule 3), clips by global norm and steps ``optax.adamw`` with the learning rate
of :func:`diptych.core.optim.lr_at` injected as a number.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from diptych.backends.facade import base_weights, lora_config, model_dtype, model_module, set_remat
from diptych.backends.jax import kernels as kernels_mod
from diptych.backends.jax import model as model_lib
from diptych.backends.jax import sharding as sharding_lib
from diptych.backends.jax.sharding import named_leaves
from diptych.core import train_step as TS
from diptych.core.optim import OptimConfig, lr_at
from diptych.core.spec import value_head_init
from diptych.core.train_batch import needed_outputs

VALUE_HEAD = ("value_head.weight", "value_head.bias")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass
class TrainState:
    """Everything one training run changes: weights, AdamW state, step (an immutable value).

    ``params`` is ``{"model": nnx.State of the decoder's Params, "value_head": {"weight",
    "bias"} or None}`` in float32 (the master weights); the forward and backward run in
    ``compute_dtype`` (bfloat16 under ``mixed_precision="bf16"``). ``step`` counts applied
    updates (skipped steps do not count) and indexes the learning-rate schedule.
    ``model`` merges the current weights into a module (once per ``params``, then cached) for
    generation and scoring; a recurrent model's depth set on it with ``set_depth`` is what the
    next :func:`train_step` trains with (it travels in the graphdef to the returned state).
    ``mesh`` (a ``jax.sharding.Mesh``, set by :func:`diptych.backends.jax.sharding.shard_state`) is where
    params and optimizer state live by the core's partition rules; each step splits its micro-batches over
    ``data x fsdp`` on it. None: one device. ``seed`` (the run's, from :func:`init_train_state`) seeds LoRA
    dropout: micro-batch ``i`` of step ``step`` drops with the key of :func:`dropout_key`, so a run is the same
    for the same seed and a resumed one continues it exactly.
    """

    graphdef: Any
    rest: Any
    params: dict[str, Any]
    opt_state: Any
    optim: OptimConfig
    compute_dtype: str = "float32"
    step: int = 0
    mesh: Any = None
    seed: int = 0
    _merged: tuple[Any, nnx.Module] | None = field(default=None, repr=False, compare=False)

    @property
    def model(self) -> nnx.Module:
        # Cached so that set_depth(state.model, r, k) sticks; keyed on the params object, which
        # load_weights replaces, so a stale module is never returned.
        if self._merged is None or self._merged[0] is not self.params:
            module = nnx.merge(self.graphdef, _cast(self.params["model"], self.compute_dtype), self.rest)
            self._merged = (self.params, module)
        return self._merged[1]

    @property
    def spec(self) -> Any:
        return self.model.spec

    @property
    def value_head(self) -> dict[str, jax.Array] | None:
        return self.params["value_head"]

    @property
    def tx(self) -> optax.GradientTransformation:
        return make_optimizer(self.optim)


def init_train_state(model: nnx.Module, optim: OptimConfig, *, value_head: bool = False, seed: int = 0,
                     mesh: Any = None, remat: str | None = None) -> TrainState:
    """Wrap a built model for training.

    With ``optim.mixed_precision="bf16"`` the model runs in bfloat16 and its float32
    weights become the master copy. The value head (``[H] -> 1``, float32, for PPO) is
    initialised in numpy from ``seed`` exactly as on torch. ``mesh`` (a ``MeshConfig``, a mapping or a
    ``Mesh``) shards the state over the devices (:func:`diptych.core.mesh.resolve`: ``None`` keeps one
    device); ``remat`` (``none`` | ``layer``) sets activation checkpointing on the model first. ``seed`` also
    seeds LoRA dropout (``TrainState.seed``).
    """
    if not isinstance(optim, OptimConfig):
        raise TypeError(f"optim must be an OptimConfig, got {type(optim).__name__}.")
    if remat is not None:
        _set_remat(model, remat)
    compute = "bfloat16" if optim.mixed_precision == "bf16" else "float32"
    dtype = _model_dtype(model)
    if compute == "float32" and dtype != "float32":
        raise ValueError(f"Training a {dtype} model needs optim.mixed_precision='bf16' (float32 master "
                         "weights); or build the model in float32.")
    lora = lora_config(__package__, model)
    _, params, _ = nnx.split(model, nnx.Param, ...)  # a LoRA model's base is not an nnx.Param: it rides in rest
    if lora is not None and not jax.tree.leaves(params):
        raise ValueError("This LoRA model has no trainable adapter (every parameter is frozen).")
    master = _cast(params, "float32")
    if compute != dtype:
        lib = _lib(model)
        rebuilt = lib.build(model.spec, base_weights(__package__, model), dtype=compute, **_build_options(model))
        if lora is not None:
            rebuilt = _lora().apply_lora(rebuilt, lora, adapters=_lora().export_adapters(model))
        model = rebuilt
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    head = None
    if value_head:
        w, b = value_head_init(model.spec, seed)
        head = {"weight": jnp.asarray(w), "bias": jnp.asarray(b)}
    tree = {"model": master, "value_head": head}
    opt_state = make_optimizer(optim).init(tree)
    state = TrainState(graphdef=graphdef, rest=rest, params=tree, opt_state=opt_state, optim=optim,
                       compute_dtype=compute, seed=int(seed))
    mesh = sharding_lib.resolve_mesh(mesh)
    if mesh is not None and lora is not None:
        raise ValueError("LoRA training runs on one device for now; give the run mesh: {fsdp: 1} (or one device).")
    return state if mesh is None else sharding_lib.shard_state(state, mesh)


def _lora() -> ModuleType:
    from diptych.backends.jax import lora

    return lora


_lib: Callable[[Any], ModuleType] = functools.partial(model_module, "diptych.backends.jax")
"""The model module for a spec or model: ``recurrent`` for recurrent-depth models, else ``model``."""
_model_dtype = model_dtype


def _set_remat(model: Any, remat: str) -> None:
    set_remat("diptych.backends.jax", model, remat)


def _build_options(model: Any) -> dict[str, Any]:
    """What a rebuild must keep: the kernels mode of a decoder, the depth (r, k) of a recurrent model."""
    if _lib(model) is model_lib:
        return {"kernels": model.kernels}
    num_steps, num_grad_steps = getattr(model, "depth", (None, None))
    return {"num_steps": num_steps, "num_grad_steps": num_grad_steps}


def _current_graphdef(state: TrainState) -> Any:
    """The graphdef of ``state.model`` as it is now: it carries a recurrent model's (r, k) set since init."""
    return nnx.split(state.model, nnx.Param, ...)[0]


@functools.lru_cache(maxsize=64)
def make_optimizer(optim: OptimConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm -> adamw`` with an injectable learning rate (set from ``lr_at`` every step)."""
    mask = None
    if not optim.decay_1d and optim.weight_decay:
        mask = lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree)
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(  # else the mask is taken for a schedule
        learning_rate=lr_at(0, optim), b1=optim.betas[0], b2=optim.betas[1], eps=optim.eps,
        weight_decay=optim.weight_decay, mask=mask)
    clip = optax.clip_by_global_norm(optim.max_grad_norm) if optim.max_grad_norm > 0 else optax.identity()
    return optax.chain(clip, adamw)


# -- the step -----------------------------------------------------------------------------------
def train_step(state: TrainState, microbatches: Sequence[Mapping[str, np.ndarray]], loss: str | Mapping[str, float],
               loss_config: Any, *, temperature: float = 1.0) -> tuple[TrainState, dict[str, float]]:
    """:meth:`diptych.core.backend.Backend.train_step` on JAX: returns a new (immutable) state.

    The gradient sums are divided once and clipped inside one jitted ``_apply``; a skipped step returns
    ``state`` itself. Metrics: :func:`diptych.core.train_step.step_metrics`.
    """
    graphdef = _current_graphdef(state)
    acc, totals = _accumulate(state, graphdef, microbatches, loss, loss_config, temperature)
    lr = lr_at(state.step, state.optim)
    params, opt_state, norm = _apply(state.optim, totals.plan.weights, state.params, state.opt_state, acc,
                                     jnp.asarray(totals.dens, jnp.float32), jnp.float32(lr))
    metrics = totals.report(state.step, float(norm), lr)
    if metrics["skipped"]:
        return state, metrics
    return TrainState(graphdef=graphdef, rest=state.rest, params=params, opt_state=opt_state, optim=state.optim,
                      compute_dtype=state.compute_dtype, step=state.step + 1, mesh=state.mesh, seed=state.seed), metrics


def gradients(state: TrainState, microbatches: Sequence[Mapping[str, np.ndarray]], loss: str | Mapping[str, float],
              loss_config: Any, *, temperature: float = 1.0) -> tuple[dict[str, np.ndarray], float]:
    """:meth:`diptych.core.backend.Backend.gradients` on JAX: the divided gradient as one tree map, no update."""
    acc, totals = _accumulate(state, _current_graphdef(state), microbatches, loss, loss_config, temperature)
    w, dens = totals.plan.weights, totals.dens
    grads = jax.tree.map(lambda *gs: sum(wi / di * g for wi, di, g in zip(w, dens, gs)), *acc)
    return {n: np.array(v, dtype=np.float32) for n, v in named_leaves(grads).items()}, totals.loss


def _accumulate(state: TrainState, graphdef: Any, microbatches: Sequence[Mapping[str, np.ndarray]],
                loss: str | Mapping[str, float], loss_config: Any, temperature: float) -> tuple[Any, TS.StepTotals]:
    """Per-term float32 gradient sums of the unreduced losses (a tuple of params-shaped trees) and the totals."""
    plan = TS.prepare_step(microbatches, loss, loss_config, has_value_head=state.params["value_head"] is not None)
    names = plan.names
    depth = getattr(state.model, "depth", None)
    key = (graphdef, names, tuple(plan.configs[t] for t in names), float(temperature), state.compute_dtype, depth)
    try:
        hash(key)
    except TypeError:  # an unhashable (non-frozen) loss config: works, but compiles on every call
        micro = _micro_fn.__wrapped__(*key)
    else:
        micro = _micro_fn(*key)
    acc = tuple(jax.tree.map(jnp.zeros_like, state.params) for _ in names)
    totals = TS.StepTotals(plan)
    lora = lora_config(__package__, state.model)
    drops = lora is not None and lora.dropout > 0
    for i, mb in enumerate(microbatches):
        rng = dropout_key(state.seed, state.step, i) if drops else _NO_KEY
        s, d, m, extra, acc = micro(state.params, state.rest, acc, _device_batch(TS.host_batch(mb, plan), state.mesh),
                                    rng)
        totals.add(mb, list(np.asarray(s, np.float64)), list(np.asarray(d, np.float64)), m, extra)
    return acc, totals.close()


_NO_KEY = np.zeros(2, np.uint32)
"""The key argument of a step without LoRA dropout (unused by its program; the same shape keeps one signature)."""


def dropout_key(seed: int, step: int, micro: int) -> jax.Array:
    """The LoRA dropout key of micro-batch ``micro`` of optimizer step ``step`` in the run seeded ``seed``: a pure
    function of the three, so a run repeats per seed and a resumed run draws the masks the uninterrupted one drew.
    A raw ``uint32[2]`` key, a traced argument of the jitted step (no recompilation per step)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(int(seed)), int(step)), int(micro))


def _device_batch(batch: Mapping[str, np.ndarray], mesh: Any) -> dict[str, jax.Array]:
    """A micro-batch on device: rows split over ``data x fsdp`` on a mesh, else on the default device."""
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    return sharding_lib.shard_batch(batch, mesh)


@functools.lru_cache(maxsize=64)
def _micro_fn(graphdef: Any, names: tuple[str, ...], configs: tuple[Any, ...], temperature: float,
              compute_dtype: str, depth: tuple[Any, Any] | None = None) -> Any:
    """Compiled ``(params, rest, acc, batch, rng) -> (sums, dens, metrics, extra, acc + grads)`` for one micro-batch.

    ``rng`` is the micro-batch's LoRA dropout key (:func:`dropout_key`), installed on the traced model only, so
    every other forward (sampling, scoring, the reference) runs without dropout; it defaults to an unused key.
    ``depth`` is a recurrent model's (r, k), read from ``graphdef`` when traced; it is named in the cache key
    so that a new depth compiles a new step instead of reusing the old one. The batch's keys are part of the
    traced structure, so a micro-batch without ``old_logprobs`` compiles its own step.
    """
    cfg = dict(zip(names, configs))

    def losses(params: Any, rest: Any, batch: Mapping[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Any]:
        model = nnx.merge(graphdef, _cast(params["model"], compute_dtype), rest)
        if _lora().lora_config(model) is not None:
            _lora().set_dropout_rng(model, rng)  # a no-op at dropout 0: the program is the one without dropout
        outputs = needed_outputs(names, cfg, batch.keys())
        quantities = _model_quantities(model, params["value_head"], batch, outputs, temperature)
        inputs = TS.loss_inputs(batch, quantities, names, jax.lax.stop_gradient, outputs)
        outs = TS.run_losses(inputs, names, cfg)
        sums = jnp.stack([jnp.asarray(o[0], jnp.float32) for o in outs])
        dens = jnp.stack([jnp.asarray(o[1], jnp.float32) for o in outs])
        return sums, (dens, [o[2] for o in outs], TS.extra_metrics(inputs))

    def step(params: Any, rest: Any, acc: tuple[Any, ...], batch: Mapping[str, jax.Array],
             rng: jax.Array = _NO_KEY) -> Any:
        sums, vjp, (dens, metrics, extra) = jax.vjp(lambda p: losses(p, rest, batch, rng), params, has_aux=True)
        new_acc = []
        for i, a in enumerate(acc):
            (g,) = vjp(jnp.zeros_like(sums).at[i].set(1.0))
            new_acc.append(jax.tree.map(lambda x, y: x + y.astype(jnp.float32), a, g))
        return sums, dens, metrics, extra, tuple(new_acc)

    return jax.jit(step, donate_argnums=2)


def _model_quantities(model: nnx.Module, head: Any, batch: Mapping[str, jax.Array], outputs: frozenset[str],
                      temperature: float) -> dict[str, jax.Array]:
    """The declared differentiable outputs (log-probs, entropy, values) from this model's JAX primitives."""
    lib = _lib(model)
    return TS.model_outputs(
        outputs, batch,
        logprobs=lambda tok, am, y: lib.logprobs(model, tok, am, y, temperature),
        hidden_states=lambda tok, am: lib.hidden_states(model, tok, am),
        logprobs_and_entropy=lambda h, y: logprobs_and_entropy(h, lib.lm_head_weight(model), y, temperature,
                                                               kernels=getattr(model, "kernels", "auto")),
        values=lambda h: (h.astype(jnp.float32) @ head["weight"].T + head["bias"])[..., 0],
    )


def logprobs_and_entropy(hidden: jax.Array, weight: jax.Array, targets: jax.Array, temperature: float | jax.Array,
                         kernels: str = "auto", chunk_tokens: int = model_lib.LOGPROB_CHUNK_TOKENS,
                         ) -> tuple[jax.Array, jax.Array]:
    """Target log-probs and the full-vocabulary entropy of ``softmax(logits / temperature)``, float32.

    One call of the kernels module (the model's ``kernels`` mode), so the entropy costs no second
    pass over the logits and ``chunked`` / ``fused`` never hold ``[tokens, V]`` logits.
    """
    return kernels_mod.selective_logprobs(hidden, weight, targets, temperature, kernels=kernels,
                                          chunk_size=chunk_tokens)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(optim: OptimConfig, weights: tuple[float, ...], params: Any, opt_state: Any, acc: tuple[Any, ...],
           dens: jax.Array, lr: jax.Array) -> tuple[Any, Any, jax.Array]:
    """Divide each term's gradient once by its total denominator, then clip + AdamW."""
    grads = jax.tree.map(lambda *gs: sum(w / dens[i] * g for i, (w, g) in enumerate(zip(weights, gs))), *acc)
    norm = optax.global_norm(grads)
    clip_state, inner = opt_state
    inner = inner._replace(hyperparams={**inner.hyperparams, "learning_rate": lr})
    updates, new_opt = make_optimizer(optim).update(grads, (clip_state, inner), params)
    return optax.apply_updates(params, updates), new_opt, norm


def _cast(tree: Any, dtype: str) -> Any:
    target = _DTYPES[dtype]
    return jax.tree.map(lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def values(state: TrainState, tokens: Any, attention_mask: Any) -> jax.Array:
    """Value-head predictions ``[B, T - 1]`` (float32) aligned with the loss layout.

    Position ``t`` is the value of the prefix ``tokens[:, : t + 1]`` (the state before
    target ``tokens[:, t + 1]``), what PPO's GAE needs as ``old_values``.
    """
    head = state.params["value_head"]
    if head is None:
        raise ValueError("This train state has no value head: init_train_state(model, optim, value_head=True).")
    tokens, attention_mask = np.asarray(tokens), np.asarray(attention_mask)
    hidden = _lib(state.model).hidden_states(state.model, tokens[:, :-1], attention_mask[:, :-1])
    return (hidden.astype(jnp.float32) @ head["weight"].T + head["bias"])[..., 0]


# -- weights in and out -------------------------------------------------------------------------
def from_named(template: Any, named: Mapping[str, np.ndarray]) -> Any:
    """The inverse of :func:`named_leaves`: a tree shaped like ``template`` filled from canonical names."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = list(named_leaves(template))
    missing = [n for n in names if n not in named]
    if missing:
        raise KeyError(f"No values for parameters {', '.join(missing[:5])}.")
    leaves = [jnp.asarray(np.asarray(named[n], dtype=np.float32)).astype(leaf.dtype)
              for n, (_, leaf) in zip(names, leaves_with_path)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _host(x: Any) -> np.ndarray:
    """A float32 numpy copy of a (possibly multi-host sharded) leaf: every process gets the whole array."""
    return np.array(sharding_lib.to_host(x), dtype=np.float32)


def export_weights(state: TrainState) -> dict[str, np.ndarray]:
    """Canonical float32 HF-named weights of the policy (the master copy; no value head). A LoRA state's are its
    base with the (float32 master) adapters merged: what an HF export or a rollout engine's weight sync needs."""
    lora = lora_config(__package__, state.model)
    if lora is None:
        return {n: _host(v) for n, v in named_leaves(state.params).items() if n not in VALUE_HEAD}
    from diptych.core.lora import merge_weights

    return merge_weights(base_weights(__package__, state.model), export_adapters(state), lora)


def export_adapters(state: TrainState) -> dict[str, np.ndarray]:
    """A LoRA state's adapters by canonical name, from the float32 master copy."""
    master = nnx.merge(_current_graphdef(state), state.params["model"], state.rest)
    return _lora().export_adapters(master)


def export_value_head(state: TrainState) -> dict[str, np.ndarray] | None:
    if state.params["value_head"] is None:
        return None
    return {n: _host(v) for n, v in named_leaves(state.params).items() if n in VALUE_HEAD}


def _adam_state(opt_state: Any) -> Any:
    return opt_state[1].inner_state[0]


def export_optimizer(state: TrainState) -> dict[str, Any]:
    """AdamW moments by canonical name, backend-neutral: ``{"count", "mu": {...}, "nu": {...}}``."""
    adam = _adam_state(state.opt_state)
    as_np = lambda tree: {n: _host(v) for n, v in named_leaves(tree).items()}
    return {"count": int(adam.count), "mu": as_np(adam.mu), "nu": as_np(adam.nu)}


def load_optimizer(state: TrainState, exported: Mapping[str, Any]) -> TrainState:
    """A state with the moments of :func:`export_optimizer` (of either backend) installed."""
    count = jnp.asarray(int(exported["count"]), jnp.int32)
    clip_state, inner = state.opt_state
    adam = inner.inner_state[0]
    adam = adam._replace(count=count, mu=from_named(adam.mu, exported["mu"]), nu=from_named(adam.nu, exported["nu"]))
    inner = inner._replace(count=count, inner_state=(adam, *inner.inner_state[1:]))
    state.opt_state = (clip_state, inner)
    return state if state.mesh is None else sharding_lib.shard_state(state, state.mesh)


def load_weights(state: TrainState, weights: Mapping[str, np.ndarray]) -> TrainState:
    """A state whose weights (and value head, when given) come from canonical numpy arrays."""
    current = {n: np.asarray(v) for n, v in named_leaves(state.params).items()}
    current.update({k: v for k, v in weights.items() if k in current})
    state.params = from_named(state.params, current)
    return state if state.mesh is None else sharding_lib.shard_state(state, state.mesh)
