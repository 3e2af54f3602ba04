"""Recurrent-depth (Huginn) models in JAX: prelude -> core block r times -> coda.

The model is an ``nnx.Module`` whose ``params`` is a flat dict of ``nnx.Param`` keyed by
Huginn's checkpoint names, and the math is written as functions of that dict. The training
forward runs the first r - k iterations in a ``lax.while_loop`` on stop-gradiented inputs
(no tape, and r - k may even be a traced value) and the last k in a ``lax.scan`` whose body
is ``jax.checkpoint``-ed, so activation memory grows with k, not r. Mirrors
``diptych.backends.torch.recurrent`` function for function.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diptych.core.recurrent_spec import RecurrentSpec

_NEG = -1e30
Params = dict[str, jax.Array]


class RecurrentLM(nnx.Module):
    """Huginn's ``RavenForCausalLM`` weights; ``spec`` and ``dtype`` ride along for the facade."""

    def __init__(self, spec: RecurrentSpec, weights: dict[str, np.ndarray], dtype: str) -> None:
        self.spec = spec
        self.dtype_name = dtype
        self.params = nnx.data({k: nnx.Param(jnp.asarray(np.asarray(v, np.float32), dtype=dtype))
                                for k, v in weights.items()})

    def param_dict(self) -> Params:
        return {k: v[...] for k, v in self.params.items()}


# -- math shared by every entry point ------------------------------------------------------
def _rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)).astype(x.dtype) * w


def _rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate interleaved pairs (x[2j], x[2j+1]) as complex numbers, in float32 like Huginn."""
    cos, sin = rope
    xf = x.astype(jnp.float32)
    re, im = xf[..., 0::2], xf[..., 1::2]
    out = jnp.stack([re * cos - im * sin, im * cos + re * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def _rope_tables(positions: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    inv = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    ang = positions.astype(jnp.float32)[..., None] * inv
    return jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    rep = q.shape[2] // k.shape[2]
    if rep > 1:
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    scores = jnp.einsum("bshd,bkhd->bhsk", q, k).astype(jnp.float32) / (q.shape[-1] ** 0.5)
    scores = jnp.where(allowed[:, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhsk,bkhd->bshd", probs, v)


def _qkv(P: Params, p: str, spec: RecurrentSpec, x: jax.Array, rope) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rotated q, k and v of a sandwich block's attention: what a KV cache stores (k, v)."""
    nh, nkv, hd = spec.n_heads, spec.num_key_value_heads, spec.head_dim
    B, S, _ = x.shape
    qkv = _rms_norm(x, P[p + "norm_1.weight"], spec.norm_eps) @ P[p + "attn.Wqkv.weight"].T
    q = qkv[..., : nh * hd].reshape(B, S, nh, hd)
    k = qkv[..., nh * hd: (nh + nkv) * hd].reshape(B, S, nkv, hd)
    v = qkv[..., (nh + nkv) * hd:].reshape(B, S, nkv, hd)
    if spec.qk_bias:
        q, k = q + P[p + "attn.qk_bias"][0], k + P[p + "attn.qk_bias"][1]
    return _rope(q, rope), _rope(k, rope), v


def _block_out(P: Params, p: str, spec: RecurrentSpec, x: jax.Array, y: jax.Array) -> jax.Array:
    """The rest of a sandwich block after attention produced ``y`` [B, S, heads, head_dim]."""
    eps = spec.norm_eps
    a = y.reshape(*x.shape[:2], -1) @ P[p + "attn.proj.weight"].T
    x = _rms_norm(a + x, P[p + "norm_2.weight"], eps)
    gate, up = jnp.split(_rms_norm(x, P[p + "norm_3.weight"], eps) @ P[p + "mlp.fc.weight"].T, 2, axis=-1)
    m = (jax.nn.silu(gate) * up) @ P[p + "mlp.proj.weight"].T
    return _rms_norm(m + x, P[p + "norm_4.weight"], eps)


def _block(P: Params, p: str, spec: RecurrentSpec, x: jax.Array, rope, allowed: jax.Array) -> jax.Array:
    q, k, v = _qkv(P, p, spec, x, rope)
    return _block_out(P, p, spec, x, _attend(q, k, v, allowed))


class Context:
    """What every iteration needs besides the state: the prelude output e, RoPE tables, the mask."""

    def __init__(self, e: jax.Array, rope, allowed: jax.Array) -> None:
        self.e, self.rope, self.allowed = e, rope, allowed


def _prelude(P: Params, spec: RecurrentSpec, tokens: jax.Array, mask: jax.Array) -> Context:
    positions = jnp.clip(jnp.cumsum(mask, -1) - 1, 0, None)
    rope = _rope_tables(positions, spec.head_dim, spec.rope_base)
    S = tokens.shape[1]
    allowed = jnp.tril(jnp.ones((S, S), bool))[None] & (mask[:, None, :] > 0)
    e = P["transformer.wte.weight"][tokens] * jnp.asarray(spec.embed_scale, P["transformer.wte.weight"].dtype)
    for i in range(spec.n_layers_in_prelude):
        e = _block(P, f"transformer.prelude.{i}.", spec, e, rope, allowed)
    return Context(e, rope, allowed)


def _core_step(P: Params, spec: RecurrentSpec, ctx: Context, x: jax.Array, e: jax.Array) -> jax.Array:
    """One recurrence: s <- core_block(adapter(concat[s, e]))."""
    x = jnp.concatenate([x, e], axis=-1) @ P["transformer.adapter.weight"].T
    if "transformer.adapter.bias" in P:
        x = x + P["transformer.adapter.bias"]
    for i in range(spec.n_layers_in_recurrent_block):
        x = _block(P, f"transformer.core_block.{i}.", spec, x, ctx.rope, ctx.allowed)
    return x


def _final_hidden(P: Params, spec: RecurrentSpec, ctx: Context, x: jax.Array) -> jax.Array:
    """ln_f after the recurrence, the coda, ln_f again: what the head reads."""
    x = _rms_norm(x, P["transformer.ln_f.weight"], spec.norm_eps)
    for i in range(spec.n_layers_in_coda):
        x = _block(P, f"transformer.coda.{i}.", spec, x, ctx.rope, ctx.allowed)
    return _rms_norm(x, P["transformer.ln_f.weight"], spec.norm_eps)


def _head(P: Params, spec: RecurrentSpec) -> jax.Array:
    return P["transformer.wte.weight"] if spec.tie_embeddings else P["lm_head.weight"]


def _readout(P: Params, spec: RecurrentSpec, ctx: Context, x: jax.Array) -> jax.Array:
    """Float32 logits from a latent state."""
    return (_final_hidden(P, spec, ctx, x) @ _head(P, spec).T).astype(jnp.float32)


def _loop(P: Params, spec: RecurrentSpec, ctx: Context, x: jax.Array, n_no_grad: Any, n_grad: int,
          remat: bool) -> jax.Array:
    """r - k iterations with no tape (while_loop on constants), then k differentiable ones."""
    Pc = jax.lax.stop_gradient(P)
    cc = Context(jax.lax.stop_gradient(ctx.e), ctx.rope, ctx.allowed)
    x0 = jax.lax.stop_gradient(x)
    x_ng = jax.lax.fori_loop(0, n_no_grad, lambda _, s: _core_step(Pc, spec, cc, s, cc.e), x0)
    x = jnp.where(jnp.asarray(n_no_grad) > 0, jax.lax.stop_gradient(x_ng), x)

    def body(s, _):
        return _core_step(P, spec, ctx, s, ctx.e), None

    if n_grad:
        body = jax.checkpoint(body) if remat else body
        x, _ = jax.lax.scan(body, x, None, length=n_grad)
    return x


# -- public API (the facade calls these) ------------------------------------------------------
def build(spec: RecurrentSpec, weights: dict[str, np.ndarray], dtype: str = "float32", **options: Any) -> RecurrentLM:
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}.")
    spec.validate_weights(weights)
    model = RecurrentLM(spec, weights, dtype)
    set_depth(model, options.pop("num_steps", None), options.pop("num_grad_steps", None))
    if options:
        raise TypeError(f"Unknown build option(s) for a recurrent model: {', '.join(sorted(options))}.")
    return model


def set_depth(model: RecurrentLM, num_steps: int | None = None, num_grad_steps: int | None = None) -> None:
    """The depth used when a call passes none: how a depth-unaware trainer runs a recurrent model.

    ``num_grad_steps`` set means truncated backprop; a trainer following a ``DepthSchedule``
    calls this once per step with ``draw.num_steps, draw.n_grad``.
    """
    _split_steps(model.spec, num_steps, num_grad_steps)  # validate now, not at first use
    model.depth = (num_steps, num_grad_steps)


def export(model: RecurrentLM) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.astype(jnp.float32)) for k, v in model.param_dict().items()}


def _split_steps(spec: RecurrentSpec, num_steps: Any, num_grad_steps: int | None) -> tuple[int, int]:
    """(iterations without gradient, iterations with gradient) from the many ways to say it."""
    if num_steps is None:
        num_steps = spec.mean_recurrence
    if isinstance(num_steps, (tuple, list)):
        n_no_grad, n_grad = (int(v) for v in num_steps)
    else:
        r = int(num_steps)
        if r < 0:
            raise ValueError(f"num_steps must be >= 0, got {r}.")
        if num_grad_steps is None:
            return 0, r
        if int(num_grad_steps) < 1:
            raise ValueError(f"num_grad_steps (backprop depth k) must be >= 1, got {num_grad_steps}.")
        n_grad = min(r, int(num_grad_steps))
        n_no_grad = r - n_grad
    if n_no_grad < 0 or n_grad < 0:
        raise ValueError(f"step counts must be >= 0, got ({n_no_grad}, {n_grad}).")
    return n_no_grad, n_grad


def _inputs(spec: RecurrentSpec, tokens: Any, attention_mask: Any) -> tuple[jax.Array, jax.Array]:
    if not isinstance(tokens, jax.core.Tracer):  # check ids on the host; traced ids are the caller's promise
        host = np.asarray(tokens)
        if host.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tuple(host.shape)}.")
        if host.size and (host.min() < 0 or host.max() >= spec.padded_vocab_size):
            raise ValueError(f"token ids must lie in [0, {spec.padded_vocab_size}), got range "
                             f"[{int(host.min())}, {int(host.max())}].")
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    mask = jnp.ones_like(tokens) if attention_mask is None else jnp.asarray(attention_mask).astype(jnp.int32)
    return tokens, mask


def _initial_state(ctx: Context, init_state: Any) -> jax.Array:
    if init_state is None:
        return jnp.zeros_like(ctx.e)
    s0 = jnp.asarray(init_state)
    if s0.shape != ctx.e.shape:
        raise ValueError(f"init_state has shape {tuple(s0.shape)}, expected [batch, time, n_embd] = "
                         f"{tuple(ctx.e.shape)}; draw it with diptych.core.recurrent_spec.initial_state_noise.")
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
    if num_steps is None and num_grad_steps is None:
        num_steps, num_grad_steps = getattr(model, "depth", (None, None))
    tokens, mask = _inputs(model.spec, tokens, attention_mask)
    n_no_grad, n_grad = _split_steps(model.spec, num_steps, num_grad_steps)
    init = None if init_state is None else jnp.asarray(init_state)
    return _latent_forward_jit(model.param_dict(), model.spec, tokens, mask, init, jnp.asarray(n_no_grad, jnp.int32),
                               n_grad=n_grad, remat=remat and num_grad_steps is not None)


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
    if num_steps is None and num_grad_steps is None:
        num_steps, num_grad_steps = getattr(model, "depth", (None, None))
    tokens, mask = _inputs(model.spec, tokens, attention_mask)
    n_no_grad, n_grad = _split_steps(model.spec, num_steps, num_grad_steps)
    P = model.param_dict()
    ctx = _prelude(P, model.spec, tokens, mask)
    x = _loop(P, model.spec, ctx, _initial_state(ctx, init_state), n_no_grad, n_grad, num_grad_steps is not None)
    return _final_hidden(P, model.spec, ctx, x)


def lm_head_weight(model: RecurrentLM) -> jax.Array:
    """[V, H]: the embedding when tied."""
    return _head(model.param_dict(), model.spec)


def logprobs(model: RecurrentLM, tokens: Any, attention_mask: Any, targets: Any, temperature: float = 1.0, *,
             num_steps: Any = None, num_grad_steps: int | None = None, init_state: Any = None,
             **kw: Any) -> jax.Array:
    """``log_softmax(logits / temperature)[targets]`` [B, T] float32 over the full vocabulary."""
    kw.pop("kernels", None)
    _reject(kw)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    logits = forward(model, tokens, attention_mask, num_steps=num_steps, num_grad_steps=num_grad_steps,
                     init_state=init_state)
    lp = jax.nn.log_softmax(logits / temperature, axis=-1)
    return jnp.take_along_axis(lp, jnp.asarray(targets).astype(jnp.int32)[..., None], axis=-1)[..., 0]


def generate(model: RecurrentLM, prompts: Any, sampling: Any, **kw: Any) -> Any:
    """Fixed- or adaptive-depth generation; see ``diptych.recurrent.generate``."""
    from diptych.recurrent.generate import generate as neutral_generate

    return neutral_generate(_Ops(model), prompts, sampling, **kw)


class _Ops:
    """The few primitives the backend-neutral generation loop needs, jitted, numpy at the boundary."""

    def __init__(self, model: RecurrentLM) -> None:
        self.model, self.spec = model, model.spec
        self.P = model.param_dict()
        spec = self.spec
        self._prelude = jax.jit(lambda P, t, m: _ctx_tuple(_prelude(P, spec, t, m)))
        self._step = jax.jit(lambda P, c, x: _core_step(P, spec, _ctx_from(c), x, c[0]))
        self._logits = jax.jit(lambda P, c, x: _readout(P, spec, _ctx_from(c), x)[:, -1])

    def prelude(self, tokens: np.ndarray, mask: np.ndarray):
        return self._prelude(self.P, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32))

    def init(self, ctx, init_state: np.ndarray | None) -> jax.Array:
        return _initial_state(_ctx_from(ctx), init_state)

    def step(self, ctx, x: jax.Array) -> jax.Array:
        return self._step(self.P, ctx, x)

    def logits_last(self, ctx, x: jax.Array) -> np.ndarray:
        return np.asarray(self._logits(self.P, ctx, x))

    def latent_last(self, x: jax.Array) -> np.ndarray:
        return np.asarray(x[:, -1].astype(jnp.float32))

    def warm(self, x: jax.Array, prev_final: jax.Array) -> jax.Array:
        """Continuous CoT: every position restarts from its last final state, the new one from its left neighbour."""
        return jnp.concatenate([prev_final, prev_final[:, -1:]], axis=1)[:, -x.shape[1]:]

    def select(self, keep: np.ndarray, new: jax.Array, old: jax.Array) -> jax.Array:
        return jnp.where(jnp.asarray(keep)[:, None, None], old, new)

    def decoder(self, rows: int, capacity: int, steps: int) -> Any:
        """The KV-cached decode primitives (``diptych.backends.jax.recurrent_cache.Decoder``)."""
        from diptych.backends.jax.recurrent_cache import Decoder

        return Decoder(self.model, rows, capacity, steps)


def _ctx_tuple(ctx: Context):
    return (ctx.e, ctx.rope, ctx.allowed)


def _ctx_from(c) -> Context:
    return Context(c[0], c[1], c[2])


def _reject(kw: dict[str, Any]) -> None:
    if kw:
        raise TypeError(f"Unexpected argument(s) for a recurrent model: {', '.join(sorted(kw))}.")


# -- a minimal truncated-backprop trainer (used by diptych.recipes; the trainers issue owns the general one)
class TruncatedTrainer:
    """AdamW on masked next-token NLL with truncated backprop; ``step`` returns the loss as a float.

    One compiled step per gradient depth k (r - k is a traced loop bound), so a log-normal
    depth schedule costs at most k compilations.
    """

    def __init__(self, model: RecurrentLM, lr: float = 1e-3, weight_decay: float = 0.0, clip: float = 1.0) -> None:
        import optax

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
        n_no_grad, n_grad = _split_steps(self.model.spec, num_steps, num_grad_steps)
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
    n_no_grad, n_grad = _split_steps(spec, num_steps, num_grad_steps)
    init = None if init_state is None else jnp.asarray(init_state)

    def loss_fn(P):
        logits, _ = latent_forward_params(P, spec, tok, msk, init, n_no_grad, n_grad, num_grad_steps is not None)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.asarray(targets, jnp.int32)[..., None], -1)
        return (lp[..., 0] * jnp.asarray(weights, jnp.float32)).sum()

    loss, g = jax.jit(jax.value_and_grad(loss_fn))(model.param_dict())
    return float(loss), {k: np.asarray(v, np.float32) for k, v in g.items()}
