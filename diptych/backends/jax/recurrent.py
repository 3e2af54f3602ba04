"""Recurrent-depth (Huginn) models in JAX: prelude -> core block r times -> coda.

The model is an ``nnx.Module`` whose ``params`` is a flat dict of ``nnx.Param`` keyed by
Huginn's checkpoint names, and the math is written as functions of that dict. The training
forward runs the first r - k iterations in a ``lax.while_loop`` on stop-gradiented inputs
(no tape, and r - k may even be a traced value) and the last k in a ``lax.scan`` whose body
is ``jax.checkpoint``-ed, so activation memory grows with k, not r. Mirrors
``diptych.backends.torch.recurrent`` function for function.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diptych.backends.jax.recurrent_cache import Decoder, _bucket
from diptych.backends.jax.recurrent_layers import (  # noqa: F401  (re-exported: tests and benchmarks use them)
    _NEG,
    Context,
    Params,
    RecurrentLM,
    _attend,
    _block,
    _block_out,
    _core_step,
    _final_hidden,
    _has_rng,
    _head,
    _iteration,
    _loop,
    _prelude,
    _qkv,
    _readout,
    _rms_norm,
    _rope,
    _rope_tables,
)
from diptych.core.recurrent_spec import RecurrentSpec
from diptych.core.train_step import PerIteration
from diptych.recurrent.generate import generate as neutral_generate
from diptych.recurrent.inputs import (
    call_depth,
    check_dtype,
    check_host_tokens,
    check_init_state,
    check_logprob_arguments,
    reject_arguments,
    reject_build_options,
    split_steps,
)


# -- public API (the facade calls these) ------------------------------------------------------
def build(spec: RecurrentSpec, weights: dict[str, np.ndarray], dtype: str = "float32", **options: Any) -> RecurrentLM:
    check_dtype(dtype)
    spec.validate_weights(weights)
    model = RecurrentLM(spec, weights, dtype)
    set_depth(model, options.pop("num_steps", None), options.pop("num_grad_steps", None))
    reject_build_options(options)
    return model


def set_depth(model: RecurrentLM, num_steps: int | None = None, num_grad_steps: int | None = None) -> None:
    """The depth used when a call passes none: how a depth-unaware trainer runs a recurrent model.

    ``num_grad_steps`` set means truncated backprop; a trainer following a ``DepthSchedule``
    calls this once per step with ``draw.num_steps, draw.n_grad``.
    """
    split_steps(model.spec, num_steps, num_grad_steps)  # validate now, not at first use
    model.depth = (num_steps, num_grad_steps)


def export(model: RecurrentLM) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.astype(jnp.float32)) for k, v in model.param_dict().items()}


_split_steps = split_steps  # the old private name


def _inputs(spec: RecurrentSpec, tokens: Any, attention_mask: Any) -> tuple[jax.Array, jax.Array]:
    if not isinstance(tokens, jax.core.Tracer):  # check ids on the host; traced ids are the caller's promise
        check_host_tokens(tokens, spec.padded_vocab_size)
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    mask = jnp.ones_like(tokens) if attention_mask is None else jnp.asarray(attention_mask).astype(jnp.int32)
    return tokens, mask


def _initial_state(ctx: Context, init_state: Any) -> jax.Array:
    if init_state is None:
        return jnp.zeros_like(ctx.e)
    s0 = jnp.asarray(init_state)
    check_init_state(s0.shape, ctx.e.shape)
    return s0.astype(ctx.e.dtype)


def latent_forward_params(P: Params, spec: RecurrentSpec, tokens: jax.Array, mask: jax.Array, init_state: Any,
                          n_no_grad: Any, n_grad: int, remat: bool = True) -> tuple[jax.Array, jax.Array]:
    """(logits, final state) as a pure function of the parameter dict: what ``jax.grad`` sees."""
    ctx = _prelude(P, spec, tokens, mask)
    x = _loop(P, spec, ctx, _initial_state(ctx, init_state), n_no_grad, n_grad, remat)
    return _readout(P, spec, ctx, x), x


_latent_forward_jit = jax.jit(latent_forward_params, static_argnames=("spec", "n_grad", "remat"))


def latent_forward(model: RecurrentLM, tokens: Any, attention_mask: Any = None, *, num_steps: Any = None,
                   num_grad_steps: int | None = None, init_state: Any = None, remat: bool = True):
    n_no_grad, n_grad, truncated = call_depth(model, num_steps, num_grad_steps)
    tokens, mask = _inputs(model.spec, tokens, attention_mask)
    init = None if init_state is None else jnp.asarray(init_state)
    return _latent_forward_jit(model.param_dict(), model.spec, tokens, mask, init, jnp.asarray(n_no_grad, jnp.int32),
                               n_grad=n_grad, remat=remat and truncated)


def forward(model: RecurrentLM, tokens: Any, attention_mask: Any = None, *, num_steps: Any = None,
            init_state: Any = None, num_grad_steps: int | None = None, **kw: Any) -> jax.Array:
    """Logits [B, T, V] float32 after ``num_steps`` iterations (default: the spec's mean recurrence).

    Differentiable through every iteration unless ``num_grad_steps`` truncates it.
    """
    _reject(kw)
    return latent_forward(model, tokens, attention_mask, num_steps=num_steps, num_grad_steps=num_grad_steps,
                          init_state=init_state)[0]


def forward_train(model: RecurrentLM, tokens: Any, mask: Any, *, num_steps: int, num_grad_steps: int,
                  init_state: Any = None) -> jax.Array:
    """Truncated-backprop logits: gradient flows through the last ``num_grad_steps`` iterations only."""
    return latent_forward(model, tokens, mask, num_steps=num_steps, num_grad_steps=num_grad_steps,
                          init_state=init_state)[0]


def hidden_states(model: RecurrentLM, tokens: Any, attention_mask: Any = None, *, num_steps: Any = None,
                  num_grad_steps: int | None = None, init_state: Any = None, **kw: Any) -> jax.Array:
    """[B, T, H] after the final norm (the decoder API's seam for fused log-prob kernels)."""
    _reject(kw)
    n_no_grad, n_grad, truncated = call_depth(model, num_steps, num_grad_steps)
    tokens, mask = _inputs(model.spec, tokens, attention_mask)
    P = model.param_dict()
    ctx = _prelude(P, model.spec, tokens, mask)
    x = _loop(P, model.spec, ctx, _initial_state(ctx, init_state), n_no_grad, n_grad, truncated)
    return _final_hidden(P, model.spec, ctx, x)


def lm_head_weight(model: RecurrentLM) -> jax.Array:
    """[V, H]: the embedding when tied."""
    return _head(model.param_dict(), model.spec)


def logprobs(model: RecurrentLM, tokens: Any, attention_mask: Any, targets: Any, temperature: float = 1.0, *,
             num_steps: Any = None, num_grad_steps: int | None = None, init_state: Any = None,
             **kw: Any) -> jax.Array:
    """``log_softmax(logits / temperature)[targets]`` [B, T] float32 over the full vocabulary.

    Targets wrapped in ``diptych.core.train_step.PerIteration`` give :func:`iteration_logprobs` instead."""
    if isinstance(targets, PerIteration):
        return iteration_logprobs(model, tokens, attention_mask, targets.targets, temperature, num_steps=num_steps,
                                  num_grad_steps=num_grad_steps, init_state=init_state, **kw)
    check_logprob_arguments(temperature, kw)
    logits = forward(model, tokens, attention_mask, num_steps=num_steps, num_grad_steps=num_grad_steps,
                     init_state=init_state)
    lp = jax.nn.log_softmax(logits / temperature, axis=-1)
    return jnp.take_along_axis(lp, jnp.asarray(targets).astype(jnp.int32)[..., None], axis=-1)[..., 0]


def iteration_logprobs_params(P: Params, spec: RecurrentSpec, tokens: jax.Array, mask: jax.Array, init_state: Any,
                              targets: jax.Array, temperature: Any, n_no_grad: Any, n_grad: int) -> jax.Array:
    """[B, k, T] target log-probs of the k differentiated iterations as a pure function of the parameters: the
    r - k untaped iterations, then a scan whose rematerialised body steps the state and decodes it through the
    coda and head with the chunked selective log-prob kernel (only [B, T] per iteration is kept)."""
    from diptych.backends.jax import kernels as kernels_mod
    from diptych.backends.jax.model import LOGPROB_CHUNK_TOKENS

    ctx = _prelude(P, spec, tokens, mask)
    x = _loop(P, spec, ctx, _initial_state(ctx, init_state), n_no_grad, 0, False)

    def body(s, i):
        s = _core_step(_iteration(P, i), spec, ctx, s, ctx.e)
        lp, _ = kernels_mod.selective_logprobs(_final_hidden(P, spec, ctx, s), _head(P, spec), targets, temperature,
                                               chunk_size=LOGPROB_CHUNK_TOKENS)
        return s, lp

    xs = jnp.arange(n_grad) + jnp.asarray(n_no_grad) if _has_rng(P) else None  # LoRA dropout: numbered iterations
    _, lps = jax.lax.scan(jax.checkpoint(body), x, xs, length=n_grad)
    return jnp.moveaxis(lps, 0, 1)


_iteration_logprobs_jit = jax.jit(iteration_logprobs_params, static_argnames=("spec", "n_grad"))


def iteration_logprobs(model: RecurrentLM, tokens: Any, attention_mask: Any, targets: Any, temperature: float = 1.0,
                       *, num_steps: Any = None, num_grad_steps: int | None = None, init_state: Any = None,
                       **kw: Any) -> jax.Array:
    """[B, k, T] float32 target log-probs of each of the k differentiated iterations (oldest first), each state
    decoded through the coda and head (the trajectory loss's output)."""
    check_logprob_arguments(temperature, kw)
    n_no_grad, n_grad, _ = call_depth(model, num_steps, num_grad_steps)
    tokens, mask = _inputs(model.spec, tokens, attention_mask)
    init = None if init_state is None else jnp.asarray(init_state)
    return _iteration_logprobs_jit(model.param_dict(), model.spec, tokens, mask, init,
                                   jnp.asarray(targets).astype(jnp.int32), jnp.asarray(temperature, jnp.float32),
                                   jnp.asarray(n_no_grad, jnp.int32), n_grad=n_grad)


def generate(model: RecurrentLM, prompts: Any, sampling: Any, **kw: Any) -> Any:
    """Fixed- or adaptive-depth generation; see ``diptych.recurrent.generate``."""
    return neutral_generate(_Ops(model), prompts, sampling, **kw)


class _Ops:
    """The few primitives the backend-neutral generation loop needs, jitted, numpy at the boundary."""

    def __init__(self, model: RecurrentLM) -> None:
        self.model, self.spec = model, model.spec
        self.P = model.param_dict()

    def prelude(self, tokens: np.ndarray, mask: np.ndarray):
        """Left-padded (masked) to a bucketed width, so prompts of similar lengths share one compilation."""
        lead = _bucket(tokens.shape[1], 8) - tokens.shape[1]
        pad = ((0, 0), (lead, 0))
        return _ops_prelude(self.P, self.spec, jnp.asarray(np.pad(tokens, pad), jnp.int32),
                            jnp.asarray(np.pad(mask, pad), jnp.int32))

    def init(self, ctx, init_state: np.ndarray | None) -> jax.Array:
        if init_state is not None:  # drawn for the unpadded width: the bucket's lead positions start at zero
            init_state = np.asarray(init_state)
            lead = ctx[0].shape[1] - init_state.shape[1]
            if lead > 0:
                init_state = np.pad(init_state, ((0, 0), (lead, 0), (0, 0)))
        return _initial_state(_ctx_from(ctx), init_state)

    def step(self, ctx, x: jax.Array) -> jax.Array:
        return _ops_step(self.P, self.spec, ctx, x)

    def logits_last(self, ctx, x: jax.Array) -> np.ndarray:
        return np.asarray(_ops_logits(self.P, self.spec, ctx, x))

    def latent_last(self, x: jax.Array) -> np.ndarray:
        return np.asarray(x[:, -1].astype(jnp.float32))

    def warm(self, x: jax.Array, prev_final: jax.Array) -> jax.Array:
        """Continuous CoT: every position restarts from its last final state, the new one from its left neighbour."""
        return jnp.concatenate([prev_final, prev_final[:, -1:]], axis=1)[:, -x.shape[1]:]

    def select(self, keep: np.ndarray, new: jax.Array, old: jax.Array) -> jax.Array:
        return jnp.where(jnp.asarray(keep)[:, None, None], old, new)

    def decoder(self, rows: int, capacity: int, steps: int) -> Any:
        """The KV-cached decode primitives (``diptych.backends.jax.recurrent_cache.Decoder``)."""
        return Decoder(self.model, rows, capacity, steps)


def _ctx_tuple(ctx: Context):
    return (ctx.e, ctx.rope, ctx.allowed)


def _ctx_from(c) -> Context:
    return Context(c[0], c[1], c[2])


# Module-level (not per-_Ops) jits keyed on the static spec: a per-instance jax.jit of a fresh lambda
# recompiled every generate(cache=False) call.
@partial(jax.jit, static_argnames=("spec",))
def _ops_prelude(P: Params, spec: RecurrentSpec, tokens: jax.Array, mask: jax.Array):
    return _ctx_tuple(_prelude(P, spec, tokens, mask))


@partial(jax.jit, static_argnames=("spec",))
def _ops_step(P: Params, spec: RecurrentSpec, c, x: jax.Array) -> jax.Array:
    return _core_step(P, spec, _ctx_from(c), x, c[0])


@partial(jax.jit, static_argnames=("spec",))
def _ops_logits(P: Params, spec: RecurrentSpec, c, x: jax.Array) -> jax.Array:
    return _readout(P, spec, _ctx_from(c), x)[:, -1]


_reject = reject_arguments


# -- a minimal truncated-backprop trainer (used by diptych.recipes; the trainers issue owns the general one)
class TruncatedTrainer:
    """AdamW on masked next-token NLL with truncated backprop; ``step`` returns the loss as a float.

    One compiled step per gradient depth k (r - k is a traced loop bound), so a log-normal
    depth schedule costs at most k compilations.
    """

    def __init__(self, model: RecurrentLM, lr: float = 1e-3, weight_decay: float = 0.0, clip: float = 1.0) -> None:
        import optax  # lazy: only this minimal trainer needs it

        self.model = model
        self.tx = optax.chain(optax.clip_by_global_norm(clip), optax.adamw(lr, b1=0.9, b2=0.95,
                                                                           weight_decay=weight_decay))
        self.opt_state = self.tx.init(model.param_dict())
        spec, tx = model.spec, self.tx

        def step(P, opt_state, tokens, mask, targets, w, s0, n_no_grad, n_grad):
            def loss_fn(P):
                logits, _ = latent_forward_params(P, spec, tokens, mask, s0, n_no_grad, n_grad, remat=True)
                lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
                return -(lp * w).sum() / jnp.maximum(w.sum(), 1.0)

            loss, g = jax.value_and_grad(loss_fn)(P)
            updates, opt_state = tx.update(g, opt_state, P)
            return jax.tree_util.tree_map(lambda p, u: p + u, P, updates), opt_state, loss

        self._step = jax.jit(step, static_argnames=("n_grad",))

    def step(self, tokens: np.ndarray, mask: np.ndarray, targets: np.ndarray, weights: np.ndarray, *,
             num_steps: int, num_grad_steps: int, init_state: np.ndarray | None = None) -> float:
        n_no_grad, n_grad = split_steps(self.model.spec, num_steps, num_grad_steps)
        P, self.opt_state, loss = self._step(
            self.model.param_dict(), self.opt_state, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32),
            jnp.asarray(targets, jnp.int32), jnp.asarray(weights, jnp.float32),
            None if init_state is None else jnp.asarray(init_state), jnp.asarray(n_no_grad, jnp.int32), n_grad=n_grad)
        for k, v in P.items():
            self.model.params[k][...] = v
        return float(loss)


def loss_grads(model: RecurrentLM, tokens: Any, mask: Any, targets: Any, weights: Any, *, num_steps: Any,
               num_grad_steps: int | None = None, init_state: Any = None) -> tuple[float, dict[str, np.ndarray]]:
    """``sum(weights * logprobs[targets])`` and its gradient per canonical name (parity and tests)."""
    spec = model.spec
    tok, msk = _inputs(spec, tokens, mask)
    n_no_grad, n_grad = split_steps(spec, num_steps, num_grad_steps)
    init = None if init_state is None else jnp.asarray(init_state)

    def loss_fn(P):
        logits, _ = latent_forward_params(P, spec, tok, msk, init, n_no_grad, n_grad, num_grad_steps is not None)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.asarray(targets, jnp.int32)[..., None], -1)
        return (lp[..., 0] * jnp.asarray(weights, jnp.float32)).sum()

    loss, g = jax.jit(jax.value_and_grad(loss_fn))(model.param_dict())
    return float(loss), {k: np.asarray(v, np.float32) for k, v in g.items()}
