"""JAX cached recurrent decoding at batch > 1: neither a compilation per token nor a copy of the whole KV
cache per iteration.

The batch-8 sequential sampler once took 19x batch 1's time for 8x the tokens (issue 21 benchmark). It
compiled nothing per token; the cost was XLA on CPU copying both whole core K/V buffers
(``[core, steps, B, T, kv, hd]``) on every iteration, because the loop over iterations (and the
adaptive-depth ``_step``) wrote into the buffers it read. At batch 8 and depth 64 those buffers outgrow
the CPU caches, so every token moved ~3 GB. The compiled programs' temporaries show it exactly: 2x the
core buffer's bytes before the fix, a few percent after.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from diptych.core.sampling import SamplingConfig
from tests.conftest import count_compiles, needs_jax
from tests.recurrent.helpers import spec_and_weights

pytestmark = needs_jax

ROWS, STEPS, WIDTH, NEW = 8, 32, 16, 32


@pytest.fixture(scope="module")
def decoder():
    """A batch-8 decoder at depth 32, prefilled, with one token fed (what every later token looks like)."""
    from diptych.backends.jax import recurrent as R

    spec, w = spec_and_weights(3)
    m = R.build(spec, w)
    dec = R._Ops(m).decoder(ROWS, WIDTH + NEW, STEPS)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, spec.vocab_size, (ROWS, WIDTH)).astype(np.int32)
    mask = np.ones((ROWS, WIDTH), np.int32)
    mask[0, :5] = 0  # left padding
    _, x = dec.prefill(tokens, mask, np.zeros((ROWS, WIDTH, spec.n_embd), np.float32))
    tok = dec.feed(tokens[:, -1], np.ones(ROWS, bool))
    return dec, tok, x


def _temp_bytes(lowered) -> int:
    analysis = lowered.compile().memory_analysis()
    assert analysis is not None, "this jaxlib reports no memory analysis; the test needs it"
    return analysis.temp_size_in_bytes


def test_fixed_depth_token_never_copies_the_core_cache(decoder):
    """One fixed-depth token (all 32 iterations and the readout in one program) needs temporaries for its
    own K/V and activations only: far below one core buffer (8 rows x 48 columns x 32 iterations)."""
    from diptych.backends.jax import recurrent_cache as C

    dec, tok, x = decoder
    buffer = dec.cache["core_k"].nbytes
    temp = _temp_bytes(C._fixed.lower(dec.P, dec.spec, dec.cache, tok.arrays, x, jnp.zeros(ROWS, bool),
                                      jnp.int32(tok.col)))
    assert temp < buffer / 4, f"_fixed allocates {temp} B of temporaries; one core K buffer is {buffer} B"


def test_adaptive_depth_iteration_never_copies_the_core_cache(decoder):
    """An adaptive-depth iteration (one program per iteration) and the per-token commit of its K/V."""
    from diptych.backends.jax import recurrent_cache as C

    dec, tok, x = decoder
    buffer = dec.cache["core_k"].nbytes
    core = dec.cache["core_k"]
    cols = (jnp.zeros((core.shape[0], STEPS, ROWS, 1, *core.shape[4:]), core.dtype),) * 2
    step = _temp_bytes(C._step.lower(dec.P, dec.spec, dec.cache, cols, tok.arrays, x, jnp.int32(3),
                                     jnp.int32(tok.col)))
    commit = _temp_bytes(C._commit.lower(dec.cache, cols, jnp.full(ROWS, 5, jnp.int32), jnp.int32(tok.col)))
    assert step < buffer / 4, f"_step allocates {step} B of temporaries; one core K buffer is {buffer} B"
    assert commit < buffer / 4, f"_commit allocates {commit} B of temporaries; one core K buffer is {buffer} B"


@pytest.mark.parametrize("kw", [{}, {"exit_criterion": "latent-diff", "exit_threshold": 1e-3}],
                         ids=["fixed", "adaptive"])
def test_batch8_compilations_do_not_grow_with_the_number_of_tokens(kw):
    """A fresh model shape: generating 20 tokens (a larger cache bucket, so every shape-dependent program
    compiles again) compiles no more than generating 2 did, and a repeat compiles nothing."""
    from diptych.backends.jax import recurrent as R

    spec, w = spec_and_weights(4, n_embd=48, n_heads=3, num_key_value_heads=3)  # shapes no other test uses
    m = R.build(spec, w)
    prompts = [list(range(1 + r, 4 + 2 * r)) for r in range(ROWS)]  # 3..17 tokens: left padding

    def generate(n: int):
        return R.generate(m, prompts, SamplingConfig(max_new_tokens=n, temperature=0, eos_ids=()),
                          num_steps=6, **kw)

    with count_compiles() as short:
        generate(2)
    with count_compiles() as long:
        roll = generate(20)
    with count_compiles() as again:
        generate(20)
    assert roll.completion_tokens.shape == (ROWS, 20)
    assert 0 < len(long) <= len(short), f"20 tokens compiled {len(long)} programs, 2 tokens {len(short)}"
    assert len(again) == 0, f"{len(again)} compilations on a repeated call"
