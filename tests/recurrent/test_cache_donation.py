"""The JAX recurrent KV cache on CPU is never updated in place (donated).

With donation, ``test_cached_adaptive_exit_matches_the_latest_fallback_oracle[jax]`` failed
intermittently after other JAX work in the same process on a loaded machine (logits off by up
to 2.8 at the token after an early exit, for exactly the rows that exited before the last one
did: their slots held the post-exit iterations' K/V, not the "latest" fallback); without
donation it never did. The first test pins the fix deterministically (a donated cache is
deleted by the call that takes it); the slow one replays the failing sequence against the oracle.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import needs_jax
from tests.recurrent.helpers import spec_and_weights
from tests.recurrent.huginn_numpy_ref import huginn_generate_latest
from tests.recurrent.test_recurrent_cache import DEPTHS, GREEDY, PROMPTS, scripted_exit

pytestmark = needs_jax


def test_cpu_decoder_leaves_every_cache_it_was_given_alive():
    """Each primitive returns a fresh cache on CPU; the one it took stays readable (donated would be deleted)."""
    import jax

    from diptych.backends.jax import recurrent as R
    from diptych.backends.jax import recurrent_cache as RC

    if jax.default_backend() != "cpu":
        pytest.skip("the CPU client is the one that does not donate")
    spec, w = spec_and_weights(0, n_layers_in_recurrent_block=1)
    dec = RC.Decoder(R.build(spec, w), 2, 8, 2)
    taken = []
    dec.prefill(np.array([[1, 2], [0, 3]]), np.array([[1, 1], [0, 1]]), np.zeros((2, 2, spec.n_embd), np.float32))
    taken.append(dec.cache)
    ctx = dec.feed(np.array([4, 5]), np.array([1, 1]))
    taken.append(dec.cache)
    x = dec.step(ctx, dec.init(ctx, np.zeros((2, 1, spec.n_embd), np.float32)))
    taken.append(dec.cache)
    dec.logits_last(ctx, x)
    taken.append(dec.cache)
    dec.finish(ctx, np.array([1, 2]))  # row 0 exited after one of two iterations: _fill runs
    for i, cache in enumerate(taken):
        deleted = [k for k, v in cache.items() if v.is_deleted()]
        assert not deleted, f"call {i + 1} consumed (donated) {deleted}"
    assert RC.donates_on(dec.P["transformer.wte.weight"]) is False


@pytest.mark.slow
def test_adaptive_exit_after_other_jax_work_matches_the_oracle_every_time():
    """The sequence that failed (a truncated trainer and fixed-depth rollouts first, then the scripted
    adaptive rollout), repeated; before the fix most repetitions failed on a loaded 2-core machine."""
    from diptych.backends.jax import recurrent as R
    from tests.recurrent.test_cli_and_parity import test_truncated_trainer_lowers_the_loss_on_a_fixed_batch

    spec, w = spec_and_weights(4)
    oracle = [huginn_generate_latest(spec, w, p, 5, 6, depth_of=DEPTHS[b].__getitem__)[1]
              for b, p in enumerate(PROMPTS)]
    for _ in range(3):
        test_truncated_trainer_lowers_the_loss_on_a_fixed_batch("jax")
        model = R.build(spec, w)
        R.generate(model, PROMPTS, GREEDY, num_steps=6, record_logits=True)
        R.generate(model, PROMPTS, GREEDY, num_steps=6, record_logits=True, cache=False)
        roll = R.generate(R.build(spec, w), PROMPTS, GREEDY, num_steps=6, exit_criterion=scripted_exit(DEPTHS),
                          record_logits=True)
        for b in range(len(PROMPTS)):
            np.testing.assert_allclose(roll.extras["logits"][b], oracle[b], atol=2e-5, rtol=0)
