"""JAX recurrent generation compiles once per rollout shape: a repeated call (and, uncached, a prompt of
another width in the same bucket) runs on the executables the first call built."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core.sampling import SamplingConfig
from tests.conftest import count_compiles, needs_jax
from tests.recurrent.helpers import spec_and_weights

pytestmark = needs_jax

GREEDY = SamplingConfig(max_new_tokens=3, temperature=0, eos_ids=())
PROMPTS = [[5, 6, 7], [9, 10]]


@pytest.fixture(scope="module")
def model():
    from diptych.backends.jax import recurrent as R

    spec, w = spec_and_weights(1, n_layers_in_recurrent_block=1)
    return R, R.build(spec, w)


@pytest.mark.parametrize("kw", [{"cache": False}, {"cache": False, "exit_criterion": "latent-diff"},
                                {}, {"exit_criterion": "latent-diff"}],
                         ids=["uncached", "uncached-adaptive", "cached", "cached-adaptive"])
def test_second_identical_generate_compiles_nothing(model, kw):
    R, m = model
    first = R.generate(m, PROMPTS, GREEDY, num_steps=3, record_logits=True, **kw)
    with count_compiles() as compiles:
        again = R.generate(m, PROMPTS, GREEDY, num_steps=3, record_logits=True, **kw)
    assert len(compiles) == 0, f"{len(compiles)} compilations on a repeated call"
    np.testing.assert_array_equal(first.extras["logits"], again.extras["logits"])


def test_uncached_prompt_widths_in_one_bucket_share_a_compilation(model):
    """Prompts 2 and 3 wide (+ 3 new tokens) pad to the same width; the padding is masked, so the
    logits equal the cached path's (the exact one at fixed depth with a zero initial state)."""
    R, m = model
    R.generate(m, PROMPTS, GREEDY, num_steps=3, cache=False)
    shorter = [[5, 6], [9, 10]]
    with count_compiles() as compiles:
        plain = R.generate(m, shorter, GREEDY, num_steps=3, cache=False, record_logits=True)
    assert len(compiles) == 0
    cached = R.generate(m, shorter, GREEDY, num_steps=3, record_logits=True)
    np.testing.assert_allclose(plain.extras["logits"], cached.extras["logits"], atol=1e-5, rtol=0)
