"""The recurrent-depth parity suite: ``diptych.recurrent.parity_suite``'s numbers, compared pairwise."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from diptych.core.backend import get_backend
from diptych.parity.harness import Case, compare, logits_tolerance, register_suite
from diptych.recurrent.parity_suite import depths, recurrent_outputs, worst_grad


@register_suite("recurrent")
def recurrent_cases(ctx: Any) -> list[Case]:
    """Truncated-backprop logits, loss and the worst gradient, for every pair of ``ctx.backends``."""
    out = recurrent_outputs(ctx)
    if not out:
        return []
    r, k = depths(ctx)
    tag = f"(r={r},k={k})"
    cases = []
    names = list(out)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            cases.append(compare(f"logits:truncated{tag}", a, b, out[a]["logits"], out[b]["logits"], ctx.dtype,
                                 tol=logits_tolerance(ctx.spec, r, ctx.dtype), mask=ctx.mask))
            cases.append(compare(f"loss:truncated{tag}", a, b, out[a]["loss"], out[b]["loss"], ctx.dtype))
            worst = worst_grad(out[a]["grads"], out[b]["grads"])
            cases.append(compare(f"grads:worst={worst}", a, b, out[a]["grads"][worst], out[b]["grads"][worst],
                                 ctx.dtype))
    return cases


DEPTHS = (1, 2, 4)
"""The recurrences a golden record stores logits at (``diptych parity --record``)."""


def depth_outputs(backend: str, spec: Any, weights: dict[str, np.ndarray], dtype: str, tokens: np.ndarray,
                  mask: np.ndarray, init_state: np.ndarray, coef: np.ndarray, depths: tuple[int, ...] = DEPTHS,
                  num_grad_steps: int = 2) -> dict[str, np.ndarray]:
    """One backend's recurrent-depth numbers on given inputs: ``logits@r`` for each r of ``depths`` and, at the
    deepest r, truncated-backprop ``truncated_logits``, ``loss`` and ``grads`` (flattened by sorted name)."""
    rb = importlib.import_module(f"diptych.backends.{backend}.recurrent")  # lazy: each brings its framework
    be = get_backend(backend)
    model = rb.build(spec, weights, dtype=dtype)
    out = {f"logits@{r}": np.asarray(be.to_numpy(rb.forward(model, tokens, mask, num_steps=r, init_state=init_state)),
                                     np.float32) for r in depths}
    r, k = max(depths), min(num_grad_steps, max(depths))
    targets = np.roll(tokens, -1, axis=1)
    out["truncated_logits"] = np.asarray(be.to_numpy(rb.forward_train(
        model, tokens, mask, num_steps=r, num_grad_steps=k, init_state=init_state)), np.float32)
    loss, grads = rb.loss_grads(model, tokens, mask, targets, coef, num_steps=r, num_grad_steps=k,
                                init_state=init_state)
    out["loss"] = np.asarray([loss], np.float64)
    out["grads"] = np.concatenate([np.asarray(grads[n], np.float64).ravel() for n in sorted(grads)])
    return out
