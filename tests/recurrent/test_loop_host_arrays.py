"""The generation loop never changes a host array after handing it to a backend.

JAX on CPU dispatches asynchronously and may read a numpy argument after the call returns. The
loop used to update ``exited`` in place right after ``select(exited, ...)``; a late read froze
the rows that exited at that iteration one iteration early (right depth, wrong logits), so
``test_cached_adaptive_exit_matches_the_latest_fallback_oracle[jax]`` failed intermittently on a
loaded machine after other JAX work (up to 2.8 off, never on the first row to exit, whose
select is skipped). The spy test fails deterministically on an in-place update; the slow one
replays the failing sequence against the oracle.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from diptych.recurrent.generate import generate
from tests.conftest import needs_jax
from tests.recurrent.helpers import spec_and_weights
from tests.recurrent.huginn_numpy_ref import huginn_generate_latest
from tests.recurrent.test_recurrent_cache import DEPTHS, GREEDY, PROMPTS, scripted_exit


class _Keeper:
    """Wraps ops or a decoder; remembers every numpy mask it was handed with a copy taken at the call."""

    def __init__(self, inner, handed):
        self.inner, self.handed = inner, handed
        self.spec = getattr(inner, "spec", None)

    def select(self, keep, new, old):
        self.handed.append((keep, keep.copy()))
        return self.inner.select(keep, new, old)

    def decoder(self, *a):
        return _Keeper(self.inner.decoder(*a), self.handed)

    def __getattr__(self, name):
        attr = getattr(self.inner, name)  # run_fixed exists only where the backend has it
        if name != "run_fixed":
            return attr

        def run_fixed(ctx, x, frozen):
            self.handed.append((frozen, frozen.copy()))
            return attr(ctx, x, frozen)

        return run_fixed


@pytest.mark.parametrize("cache", [True, False])
def test_masks_handed_to_the_backend_are_never_changed_afterwards(backend, cache):
    spec, w = spec_and_weights(4)
    ops = importlib.import_module(f"diptych.backends.{backend.name}.recurrent")._Ops(backend.build(spec, w))
    handed = []
    roll = generate(_Keeper(ops, handed), PROMPTS, GREEDY, num_steps=6, exit_criterion=scripted_exit(DEPTHS),
                    cache=cache)
    assert len(handed) > 3  # rows exit at different iterations: select is called with partial masks
    changed = [i for i, (arr, at_call) in enumerate(handed) if not np.array_equal(arr, at_call)]
    assert not changed, f"masks {changed} were updated in place after the backend got them"
    if cache:
        assert roll.extras["depth"].tolist() == DEPTHS.tolist()


def test_fixed_depth_done_mask_is_a_copy(backend):
    """With EOS, run.done grows after run_fixed got it; the backend must have received a copy."""
    spec, w = spec_and_weights(4)
    ops = importlib.import_module(f"diptych.backends.{backend.name}.recurrent")._Ops(backend.build(spec, w))
    first = generate(ops, PROMPTS, GREEDY, num_steps=2)
    eos = GREEDY.__class__(max_new_tokens=5, temperature=0, eos_ids=(int(first.completion_tokens[0, 1]),))
    handed = []
    generate(_Keeper(ops, handed), PROMPTS, eos, num_steps=2)
    assert handed and all(np.array_equal(a, c) for a, c in handed)


@needs_jax
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
