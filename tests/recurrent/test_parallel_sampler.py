"""The parallel (diffusion-forcing style) sampler: run to convergence it gives the sequential sampler's greedy
tokens, rows of a padded batch are independent, and both backends agree.

The model is the tiny random recurrent model with the state half of the adapter scaled by 0.3, so the
recurrence contracts: the relative state change falls below 1e-5 within ~11 iterations (measured), and depth
24 is converged for the sequential sampler too.
"""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core.backend import get_backend
from diptych.core.sampling import SamplingConfig
from tests.conftest import BACKENDS, needs_jax, needs_torch

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
