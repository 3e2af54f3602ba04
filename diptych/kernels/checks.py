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


KERNEL_MODES: tuple[str, ...] = ("auto", "fused", "chunked", "reference")
"""How a model computes log-probs, one meaning on every backend: ``reference`` = full logits, ``chunked`` =
chunks of tokens, ``fused`` = the backend's fused kernel (Pallas / Triton), ``auto`` = fused on a GPU else
chunked."""


def check_kernels_mode(kernels: Any, fused: str) -> None:
    """Refuse an unknown ``kernels`` mode, naming the choices (``fused`` names the backend's fused kernel)."""
    if kernels not in KERNEL_MODES:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_MODES)}, got {kernels!r} (reference = full "
                         f"logits, chunked = chunks of tokens, fused = {fused}, auto = fused on a GPU else chunked).")


def check_build_args(spec: Any, dtype: str, kernels: Any, dtypes: Any, fused: str) -> None:
    """What a decoder ``build`` refuses before it allocates anything: a non-``DecoderSpec``, an unknown dtype or
    kernels mode, weights that do not match the spec (their check is the spec's own)."""
    from diptych.core.spec import DecoderSpec

    if not isinstance(spec, DecoderSpec):
        raise TypeError(f"build needs a DecoderSpec, got {type(spec).__name__}.")
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {', '.join(dtypes)}, got {dtype!r}.")
    check_kernels_mode(kernels, fused)


def check_cache_write(tokens_shape: tuple[int, ...], positions_shape: tuple[int, ...],
                      key_mask_shape: tuple[int, ...], cache_batch: int, max_len: int,
                      write_index: int | None) -> None:
    """The shape checks of a cached forward: positions like tokens, a ``[batch, max_len]`` key mask matching the
    cache, and ``t`` tokens that fit at ``write_index`` (``None`` for a traced index, checked by no one)."""
    b, t = tokens_shape
    if tuple(positions_shape) != (b, t):
        raise ValueError(f"positions shape {tuple(positions_shape)} must equal tokens shape {(b, t)}.")
    if tuple(key_mask_shape) != (b, max_len) or cache_batch != b:
        raise ValueError(f"key_mask must be [batch, max_len] = {(cache_batch, max_len)} to match the "
                         f"cache, got {tuple(key_mask_shape)} (tokens batch {b}).")
    if write_index is not None and (write_index < 0 or write_index + t > max_len):
        raise ValueError(f"Writing {t} tokens at slot {write_index} overflows the cache of max_len {max_len}; "
                         "allocate a longer cache with init_cache.")
