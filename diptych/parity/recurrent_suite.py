"""The recurrent-depth parity suite: ``diptych.recurrent.parity_suite``'s numbers, compared pairwise."""

from __future__ import annotations

from typing import Any

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
