"""Gradients of one scalar loss w.r.t. every canonical parameter, per backend, as numpy.

The loss is sum(coef * log_softmax(logits)[targets]) over live tokens. ``mode`` picks how the
logits are made: "train" = the backend's truncated ``forward_train``; "full" = a plain full
unroll; "oracle" = a full unroll in which the state after the first r - k iterations is
explicitly stop-gradiented (built from the backends' single-step primitives, not from the
truncated loop under test).
"""

from __future__ import annotations

import numpy as np


def torch_grads(spec, w, tokens, mask, targets, coef, r, k, s0, mode):
    import torch

    from diptych.backends.torch import recurrent as R

    model = R.build(spec, w)
    if mode == "train":
        logits = R.forward_train(model, tokens, mask, num_steps=r, num_grad_steps=k, init_state=s0)
    else:
        ctx = R.prelude(model, tokens, mask)
        x = R.initial_state(model, ctx, s0)
        for i in range(r):
            x = R.core_step(model, ctx, x)
            if mode == "oracle" and i == r - k - 1:
                x = x.detach()
        logits = R.readout(model, ctx, x)
    lp = torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(targets)[..., None])[..., 0]
    loss = (lp * torch.as_tensor(coef * mask, dtype=torch.float32)).sum()
    loss.backward()
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.grad.numpy().copy() if p.grad is not None else np.zeros(p.shape, np.float32)
    return float(loss.detach()), out


def jax_grads(spec, w, tokens, mask, targets, coef, r, k, s0, mode):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from diptych.backends.jax import recurrent as R

    model = R.build(spec, w)
    tok, m = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)

    def logits_of(mdl):
        if mode == "train":
            return R.forward_train(mdl, tok, m, num_steps=r, num_grad_steps=k, init_state=s0)
        P = mdl.param_dict()
        ctx = R._prelude(P, spec, tok, m)
        x = R._initial_state(ctx, s0)
        for i in range(r):
            x = R._core_step(P, spec, ctx, x, ctx.e)
            if mode == "oracle" and i == r - k - 1:
                x = jax.lax.stop_gradient(x)
        return R._readout(P, spec, ctx, x)

    def loss_fn(mdl):
        lp = jax.nn.log_softmax(logits_of(mdl), -1)
        lp = jnp.take_along_axis(lp, jnp.asarray(targets)[..., None], -1)[..., 0]
        return (lp * jnp.asarray(coef * mask, jnp.float32)).sum()

    loss, g = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    return float(loss), {name: np.asarray(v[...]) for name, v in g["params"].items()}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))
