"""Recurrent-depth quantities for `diptych parity`: truncated-backprop logits, loss and gradients.

Runs only on recurrent specs (``model_types.is_recurrent``); every backend gets the same
weights, batch, depth (r, k) and numpy-drawn initial state. This module computes the numbers;
``diptych.parity.recurrent_suite`` compares them pairwise with DESIGN.md's tolerances and
registers the suite (parity imports this module, never the reverse).
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from diptych.core.model_types import is_recurrent
from diptych.core.recurrent_spec import initial_state_noise

# DESIGN.md: fp32 logits within 1e-5 for tiny models, 1e-4 at real sizes. Rounding grows with
# the layers a token passes through, and an unrolled recurrence is as deep as a real model: a
# trained 2/2/2 checkpoint at r = 16 (36 layers) differs by 1.05e-5 with a relative error of 9e-7.
TINY_DEPTH = 16


def depths(ctx: Any) -> tuple[int, int]:
    """(r, k) of a parity run: ``--num-steps`` or the mean recurrence, and the mean backprop depth capped at r."""
    spec = ctx.spec
    r = int(ctx.num_steps or spec.mean_recurrence)
    return r, max(1, min(int(spec.mean_backprop_depth), r))


def unrolled_depth(spec: Any, num_steps: int) -> int:
    """Layers a token passes through at ``num_steps`` iterations."""
    return spec.n_layers_in_prelude + num_steps * spec.n_layers_in_recurrent_block + spec.n_layers_in_coda


def logits_tolerance_scale(spec: Any, num_steps: int) -> int:
    """How much looser than the tiny-model logits tolerance an unrolled depth is judged: 1 or 10."""
    return 1 if unrolled_depth(spec, num_steps) <= TINY_DEPTH else 10


def recurrent_outputs(ctx: Any) -> dict[str, dict[str, Any]]:
    """Per backend: truncated-backprop ``logits``, ``loss`` and ``grads`` (numpy); empty for a non-recurrent spec."""
    spec = ctx.spec
    if not is_recurrent(spec):
        return {}
    r, k = depths(ctx)
    tokens, mask = ctx.tokens, ctx.mask
    targets = np.roll(tokens, -1, axis=1)
    coef = np.random.default_rng(0).standard_normal(tokens.shape).astype(np.float32) * mask
    s0 = initial_state_noise(spec, (*tokens.shape, spec.n_embd), np.random.default_rng(1))
    out = {}
    for name in ctx.backends:
        # by name: this module stays framework-free, each backend's module brings its framework
        rb = importlib.import_module(f"diptych.backends.{name}.recurrent")
        model = rb.build(spec, ctx.weights, dtype=ctx.dtype)
        logits = rb.forward_train(model, tokens, mask, num_steps=r, num_grad_steps=k, init_state=s0)
        loss, grads = rb.loss_grads(model, tokens, mask, targets, coef, num_steps=r, num_grad_steps=k, init_state=s0)
        out[name] = {"logits": np.asarray(logits.detach() if hasattr(logits, "detach") else logits, np.float32),
                     "loss": np.asarray([loss]), "grads": grads}
    return out


def worst_grad(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> str:
    """The parameter whose gradients differ most, relative to its scale."""
    return max(b, key=lambda n: _rel(a[n], b[n]))


def _rel(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-30))
