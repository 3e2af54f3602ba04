"""The parallel (diffusion-forcing style) sampler: run to convergence it gives the sequential sampler's greedy
tokens, rows of a padded batch are independent, both backends agree, and each backend's one primitive per outer
step (``advance``: a window, with JAX's cache of the frozen prefix) equals the full-buffer composition of the
model's own prelude, core step and readout.

The model is the tiny random recurrent model with the state half of the adapter scaled by 0.3, so the
recurrence contracts: the relative state change falls below 1e-5 within ~11 iterations (measured), and depth
24 is converged for the sequential sampler too.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from diptych.core.backend import get_backend
from diptych.core.sampling import SamplingConfig
from diptych.recurrent.parallel import parallel_generate, window_width
from tests.conftest import BACKENDS, count_compiles, needs_jax, needs_torch

from .helpers import spec_and_weights

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
DEPTH = 24


def contracting_model(name: str):
    spec, w = spec_and_weights(0)
    a = w["transformer.adapter.weight"].copy()
    a[:, : spec.n_embd] *= 0.3
    w["transformer.adapter.weight"] = a
    b = get_backend(name)
    return b, b._impl(spec), b.build(spec, w)


def greedy(max_new: int = 8, **kw) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=max_new, temperature=0.0, pad_id=0, **kw)


@pytest.mark.slow  # 40-120 s on the loaded shared CPU (sequential depth-24 decoding)
@pytest.mark.parametrize("name", BACKENDS)
def test_parallel_greedy_tokens_equal_the_sequential_samplers_at_convergence(name):
    _, R, model = contracting_model(name)
    seq = R.generate(model, PROMPTS, greedy(), num_steps=DEPTH)
    par = R.generate(model, PROMPTS, greedy(), num_steps=DEPTH, sampler="parallel", tol=1e-5)
    np.testing.assert_array_equal(par.completion_tokens, seq.completion_tokens)
    np.testing.assert_array_equal(par.completion_mask, seq.completion_mask)
    np.testing.assert_allclose(par.logprobs, seq.logprobs, atol=1e-4)
    depth = par.extras["depth"]
    assert depth.max() < DEPTH  # positions exited on convergence, not at the cap
    # far fewer full-buffer iterations than the sequential sampler's token-iterations
    assert par.extras["outer_steps"] < 0.5 * seq.completion_mask.sum() / len(PROMPTS) * DEPTH
    # an unconverged sequential sampler (depth 2) differs, so the comparison can fail
    assert (R.generate(model, PROMPTS, greedy(), num_steps=2).completion_tokens != seq.completion_tokens).any()


@pytest.mark.slow  # 40-120 s on the loaded shared CPU (sequential depth-24 decoding)
@pytest.mark.parametrize("name", BACKENDS)
def test_rows_of_a_padded_batch_are_independent_and_stop_on_their_own(name):
    _, R, model = contracting_model(name)
    first = R.generate(model, PROMPTS, greedy(), sampler="parallel", num_steps=DEPTH)
    eos = int(first.completion_tokens[1, 2])  # row 1 stops at its third token; others maybe later or never
    sc = greedy(eos_ids=(eos,))
    batch = R.generate(model, PROMPTS, sc, sampler="parallel", num_steps=DEPTH)
    assert batch.completion_mask[1].sum() <= 3 and not batch.truncated[1]
    for i, p in enumerate(PROMPTS):
        alone = R.generate(model, [p], sc, sampler="parallel", num_steps=DEPTH)
        np.testing.assert_array_equal(batch.completion_tokens[i], alone.completion_tokens[0])
        np.testing.assert_array_equal(batch.completion_mask[i], alone.completion_mask[0])
        np.testing.assert_allclose(batch.logprobs[i], alone.logprobs[0], atol=1e-5)
        assert batch.truncated[i] == alone.truncated[0]
        assert np.abs(batch.extras["depth"][i] - alone.extras["depth"][0]).max() <= 1
    seq = R.generate(model, PROMPTS, sc, num_steps=DEPTH)
    np.testing.assert_array_equal(batch.completion_tokens, seq.completion_tokens)


@needs_jax
@needs_torch
def test_jax_and_torch_parallel_samplers_agree():
    outs = {n: contracting_model(n)[1].generate(contracting_model(n)[2], PROMPTS, greedy(6), sampler="parallel",
                                                num_steps=DEPTH) for n in ("jax", "torch")}
    np.testing.assert_array_equal(outs["jax"].completion_tokens, outs["torch"].completion_tokens)
    np.testing.assert_allclose(outs["jax"].logprobs, outs["torch"].logprobs, atol=1e-4)
    assert np.abs(outs["jax"].extras["depth"] - outs["torch"].extras["depth"]).max() <= 1


@needs_torch
def test_bad_sampler_options_are_refused_in_one_line():
    _, R, model = contracting_model("torch")
    with pytest.raises(ValueError, match="sampler must be"):
        R.generate(model, PROMPTS, greedy(), sampler="jacobi")
    with pytest.raises(ValueError, match="exit_criterion"):
        R.generate(model, PROMPTS, greedy(), sampler="parallel", exit_criterion="kl")
    with pytest.raises(ValueError, match="tol must be > 0"):
        R.generate(model, PROMPTS, greedy(), sampler="parallel", tol=0.0)


class Recording:
    """A backend's parallel primitives, recording every ``advance`` call's inputs and outputs."""

    def __init__(self, ops) -> None:
        self.ops, self.spec, self.calls = ops, ops.spec, []

    def begin(self, rows: int, width: int):
        return self.ops.begin(rows, width)

    def advance(self, state, tokens, mask, keep, start, width):
        state, change, logits = self.ops.advance(state, tokens, mask, keep, start, width)
        self.calls.append((tokens.copy(), mask.copy(), keep.copy(), start.copy(), width, change, logits))
        return state, change, logits


def full_buffer(name: str, model):
    """The old composition, from the model's own layers: ``(tokens, mask, x) -> (ctx, step, readout)`` over the
    whole buffer, recomputed from scratch every outer step (no window, no cache)."""
    if name == "jax":
        import jax.numpy as jnp

        from diptych.backends.jax.recurrent_layers import _core_step, _prelude, _readout

        P = model.param_dict()

        def prelude(tokens, mask):
            return _prelude(P, model.spec, jnp.asarray(tokens), jnp.asarray(mask))

        return (prelude, lambda c, x: np.asarray(_core_step(P, model.spec, c, jnp.asarray(x), c.e)),
                lambda c, x: np.asarray(_readout(P, model.spec, c, jnp.asarray(x))))
    import torch

    from diptych.backends.torch.recurrent_layers import core_step, prelude, readout

    def tensor(x):
        return torch.as_tensor(np.asarray(x))

    return (lambda tokens, mask: prelude(model, tokens, mask),
            lambda c, x: core_step(model, c, tensor(x)).detach().numpy(),
            lambda c, x: readout(model, c, tensor(x)).detach().numpy())


@pytest.mark.parametrize("rows", [3, 1])
@pytest.mark.parametrize("name", BACKENDS)
def test_advance_equals_the_full_buffer_iteration_at_every_outer_step(name, rows):
    """Replays every call of a rollout (a padded batch, and one row, which JAX updates by slice instead of a
    gather) on the full-buffer composition: the window's relative changes and logits match, so the keys and values
    JAX kept for the frozen prefix are the ones a recomputation gives."""
    model = contracting_model(name)[2]
    ops = Recording(importlib.import_module(f"diptych.backends.{name}.recurrent_parallel").ParallelOps(model))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [10, 11], [12, 13, 14]][:rows]
    parallel_generate(ops, prompts, greedy(10), num_steps=DEPTH)
    prelude, step, readout = full_buffer(name, model)
    V = model.spec.vocab_size
    x = np.zeros((len(prompts), ops.calls[0][0].shape[1], model.spec.n_embd), np.float32)
    for tokens, mask, keep, start, width, change, logits in ops.calls:
        ctx = prelude(tokens, mask)
        new = np.where(keep[..., None], x, step(ctx, x))
        full_change = np.linalg.norm(new - x, axis=-1) / np.maximum(np.linalg.norm(x, axis=-1), 1e-30)
        where = start[:, None] + np.arange(width)
        np.testing.assert_allclose(change, np.take_along_axis(full_change, where, 1), rtol=1e-3, atol=1e-6)
        full_logits = readout(ctx, new)[..., :V]
        np.testing.assert_allclose(logits, np.take_along_axis(full_logits, where[..., None], 1), atol=2e-5)
        x = new
    starts = np.stack([c[3] for c in ops.calls])
    widths = [c[4] for c in ops.calls]
    W = x.shape[1]
    # the comparison covers windows that leave a frozen prefix out, at different starts per row
    assert min(widths) < W and starts.max() > 0
    assert rows == 1 or (starts.max(1) > starts.min(1)).any()
    assert all(w == window_width(w, W) for w in widths)


def test_window_widths_are_few_and_cover_the_need():
    widths = {window_width(n, 200) for n in range(1, 201)}
    assert widths == {8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 200}
    for n in range(1, 300):
        assert n <= window_width(n, 300) <= max(8, 1.5 * n)
    assert window_width(3, 5) == 5  # never wider than the buffer


@needs_jax
def test_jax_parallel_sampler_compiles_nothing_on_a_repeated_call():
    _, R, model = contracting_model("jax")
    first = R.generate(model, PROMPTS, greedy(6), sampler="parallel", num_steps=DEPTH)
    with count_compiles() as compiles:
        again = R.generate(model, PROMPTS, greedy(6), sampler="parallel", num_steps=DEPTH)
    assert len(compiles) == 0, f"{len(compiles)} compilations on a repeated call"
    np.testing.assert_array_equal(first.completion_tokens, again.completion_tokens)
    np.testing.assert_array_equal(first.logprobs, again.logprobs)
