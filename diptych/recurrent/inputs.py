"""What both backends' recurrent models check and decide before any array math, written once.

How many iterations run with and without gradient, which token ids and initial states are
valid, which dtypes and build options exist: the same rules and the same error messages on
JAX and torch, in numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DTYPES = ("float32", "bfloat16")


def split_steps(spec: Any, num_steps: Any, num_grad_steps: int | None) -> tuple[int, int]:
    """(iterations without gradient, iterations with gradient) from the many ways to say it.

    ``num_steps`` may be None (the spec's ``mean_recurrence``), an int r, or a pair
    ``(n_no_grad, n_grad)``; ``num_grad_steps`` k truncates backprop to the last k of r.
    """
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


def check_token_ids(shape: tuple[int, ...], lo: int | None, hi: int | None, vocab: int) -> None:
    """Tokens must be ``[batch, time]`` ids in ``[0, vocab)``; ``lo``/``hi`` are their min/max (None when empty)."""
    if len(shape) != 2:
        raise ValueError(f"tokens must be [batch, time], got shape {tuple(shape)}.")
    if lo is not None and (lo < 0 or hi >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab}), got range [{int(lo)}, {int(hi)}].")


def check_host_tokens(tokens: Any, vocab: int) -> None:
    """:func:`check_token_ids` on a host array (numpy or anything ``np.asarray`` reads)."""
    host = np.asarray(tokens)
    empty = host.size == 0 or host.ndim != 2
    check_token_ids(host.shape, None if empty else int(host.min()), None if empty else int(host.max()), vocab)


def check_init_state(shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """An initial latent state must match the prelude output ``[batch, time, n_embd]``."""
    if tuple(shape) != tuple(expected):
        raise ValueError(f"init_state has shape {tuple(shape)}, expected [batch, time, n_embd] = "
                         f"{tuple(expected)}; draw it with diptych.core.recurrent_spec.initial_state_noise.")


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}.")


def reject_build_options(options: dict[str, Any]) -> None:
    """Build options left over after a backend took the ones it knows."""
    if options:
        raise TypeError(f"Unknown build option(s) for a recurrent model: {', '.join(sorted(options))}.")


def reject_arguments(kw: dict[str, Any]) -> None:
    """Keyword arguments of a decoder-API call that a recurrent model does not take."""
    if kw:
        raise TypeError(f"Unexpected argument(s) for a recurrent model: {', '.join(sorted(kw))}.")


def call_depth(model: Any, num_steps: Any, num_grad_steps: int | None) -> tuple[int, int, bool]:
    """A call's depth: its own, else the model's ``set_depth`` default.

    Returns ``(n_no_grad, n_grad, truncated)``; ``truncated`` (a backprop depth was given)
    is what turns rematerialisation on.
    """
    if num_steps is None and num_grad_steps is None:
        num_steps, num_grad_steps = getattr(model, "depth", (None, None))
    n_no_grad, n_grad = split_steps(model.spec, num_steps, num_grad_steps)
    return n_no_grad, n_grad, num_grad_steps is not None


def check_logprob_arguments(temperature: float, kw: dict[str, Any]) -> None:
    """``logprobs`` takes the decoder API's ``kernels`` (recurrent models have no fused kernel) and a
    temperature > 0; anything else is an error."""
    kw.pop("kernels", None)
    reject_arguments(kw)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
