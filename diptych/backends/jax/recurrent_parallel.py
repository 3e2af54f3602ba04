"""The JAX primitives of the parallel sampler (``diptych.recurrent.parallel``): every position at once, jitted
(the buffer width is fixed for a whole rollout, so each function compiles once per batch shape)."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diptych.backends.jax.recurrent_layers import Context, Params, RecurrentLM, _core_step, _prelude, _readout
from diptych.core.recurrent_spec import RecurrentSpec
from diptych.recurrent.parallel import parallel_generate


@partial(jax.jit, static_argnames=("spec",))
def _prelude_jit(P: Params, spec: RecurrentSpec, tokens: jax.Array, mask: jax.Array):
    ctx = _prelude(P, spec, tokens, mask)
    return (ctx.e, ctx.rope, ctx.allowed)


@partial(jax.jit, static_argnames=("spec",))
def _step_jit(P: Params, spec: RecurrentSpec, c, x: jax.Array) -> jax.Array:
    return _core_step(P, spec, Context(*c), x, c[0])


@partial(jax.jit, static_argnames=("spec",))
def _logits_jit(P: Params, spec: RecurrentSpec, c, x: jax.Array) -> jax.Array:
    return _readout(P, spec, Context(*c), x)


class ParallelOps:
    """Full-buffer prelude, one core iteration, all-position readouts and latents, per-position keep."""

    def __init__(self, model: RecurrentLM) -> None:
        self.model, self.spec = model, model.spec
        self.P = model.param_dict()

    def prelude(self, tokens: np.ndarray, mask: np.ndarray):
        return _prelude_jit(self.P, self.spec, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32))

    def init(self, ctx, init_state: np.ndarray | None) -> jax.Array:
        return jnp.zeros_like(ctx[0]) if init_state is None else jnp.asarray(init_state, ctx[0].dtype)

    def step(self, ctx, x: jax.Array) -> jax.Array:
        return _step_jit(self.P, self.spec, ctx, x)

    def logits_all(self, ctx, x: jax.Array) -> np.ndarray:
        return np.asarray(_logits_jit(self.P, self.spec, ctx, x))

    def latents(self, x: jax.Array) -> np.ndarray:
        return np.asarray(x.astype(jnp.float32))

    def keep(self, frozen: np.ndarray, new: jax.Array, old: jax.Array) -> jax.Array:
        return jnp.where(jnp.asarray(frozen)[..., None], old, new)


def generate(model: RecurrentLM, prompts: Any, sampling: Any, **kw: Any) -> Any:
    """Parallel sampling on a JAX recurrent model; see ``diptych.recurrent.parallel.parallel_generate``."""
    return parallel_generate(ParallelOps(model), prompts, sampling, **kw)
