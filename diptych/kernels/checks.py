"""Input checks shared by every backend's kernels, so a bad call fails the same way (and message) on JAX and torch.

Written over shapes and Python numbers only: no framework import, and a traced JAX temperature (inside
the caller's ``jit``) is let through, since its value is not known until it runs.
"""

from __future__ import annotations

from typing import Any


def check_selective_logprobs_inputs(hidden: Any, weight: Any, targets: Any, temperature: Any,
                                    chunk_size: int) -> None:
    """Refuse mismatched ``hidden [..., H]`` / ``weight [V, H]`` / ``targets`` shapes, a non-positive
    temperature and a chunk size below one, each with what to pass instead."""
    if weight.ndim != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"selective_logprobs wants hidden [..., H] and weight [V, H] with the same H; got hidden "
            f"{tuple(hidden.shape)} and weight {tuple(weight.shape)} (pass lm_head.weight, not its transpose)."
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have hidden's leading shape {tuple(hidden.shape[:-1])}; got {tuple(targets.shape)}."
        )
    try:
        t = float(temperature)
    except TypeError:  # a traced value (jax.errors.ConcretizationTypeError is a TypeError): checked by the caller
        t = None
    if t is not None and not t > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}.")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}.")
