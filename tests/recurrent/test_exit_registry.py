"""Exit criteria are registered with their contract, and the generation loop obeys it.

A criterion registered here (not built in) drives adaptive-exit generation on every backend,
and what the loop computes per iteration follows the contract's ``needs``.
"""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core.sampling import SamplingConfig
from diptych.recurrent.exit import (
    CRITERIA,
    ExitError,
    get_exit_criterion,
    register_exit_criterion,
    unregister_exit_criterion,
)
from diptych.recurrent.generate import generate
from tests.recurrent.helpers import spec_and_weights
from tests.recurrent.test_adaptive_exit import ScriptedOps

GREEDY = SamplingConfig(max_new_tokens=3, temperature=0, eos_ids=())


@pytest.fixture
def latent_step():
    """Exit once no latent coordinate moved by more than the threshold (an L-inf cousin of latent-diff)."""

    @register_exit_criterion("test-latent-step", default_threshold=1e-4, needs=("latent",))
    def fn(state, inputs):
        assert set(inputs) == {"latent"}  # exactly what the contract asked for
        prev, state["x"] = state.get("x"), inputs["latent"]
        return np.full(state["batch"], np.inf) if prev is None else np.abs(inputs["latent"] - prev).max(-1)

    yield "test-latent-step"
    unregister_exit_criterion("test-latent-step")


@pytest.fixture
def confident():
    """Exit at the first iteration whose top probability reaches the threshold (reads log-probs)."""

    @register_exit_criterion("test-confident", default_threshold=0.9, needs=("log_probs",), exits_when="at_least")
    def fn(state, inputs):
        lp = inputs["log_probs"]
        assert np.allclose(np.exp(lp).sum(-1), 1.0)  # normalised by the registry, not by the criterion
        return np.exp(lp.max(-1))

    yield "test-confident"
    unregister_exit_criterion("test-confident")


def test_registered_criterion_drives_adaptive_exit_on_each_backend(backend, latent_step, confident):
    spec, w = spec_and_weights(0)
    w["transformer.adapter.weight"][:, : spec.n_embd] = 0.0  # stateless core: s_2 == s_1 exactly
    model = backend.build(spec, w)
    prompts = [[5, 6, 7], [9, 10]]
    fixed = backend.generate(model, prompts, GREEDY, num_steps=6)
    roll = backend.generate(model, prompts, GREEDY, num_steps=6, exit_criterion=latent_step)
    assert roll.extras["depth"][:, 0].tolist() == [6, 6]  # prefill never exits
    assert (roll.extras["depth"][:, 1:] == 2).all()  # the first iteration that changes nothing
    assert np.array_equal(roll.completion_tokens, fixed.completion_tokens)
    # at_least with threshold 0: every row passes at its first iteration
    sure = backend.generate(model, prompts, GREEDY, num_steps=6, exit_criterion=confident, exit_threshold=0.0)
    assert (sure.extras["depth"][:, 1:] == 1).all()


class CountingOps(ScriptedOps):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.readouts = self.latents = 0

    def logits_last(self, ctx, x):
        self.readouts += 1
        return super().logits_last(ctx, x)

    def latent_last(self, x):
        self.latents += 1
        return super().latent_last(x)


def test_the_loop_computes_only_what_the_contract_needs(latent_step, confident):
    spec, _ = spec_and_weights()
    ops = CountingOps(spec, n=[3, 5])
    roll = generate(ops, [[1], [2]], GREEDY, num_steps=8, exit_criterion=latent_step, cache=False)
    assert roll.extras["depth"][:, 1:].tolist() == [[3, 3], [5, 5]]
    assert ops.readouts == 3  # one final readout per token, none per iteration
    assert ops.latents == 5 + 5  # tokens 1 and 2: one latent per iteration until the slowest row exits

    ops = CountingOps(spec, n=[3, 5])
    generate(ops, [[1], [2]], GREEDY, num_steps=8, exit_criterion=confident, exit_threshold=0.0, cache=False)
    assert ops.latents == 0 and ops.readouts == 3 + 2  # one per-iteration readout each for tokens 1 and 2


def test_registration_states_a_valid_contract(latent_step):
    assert CRITERIA[latent_step].needs == ("latent",) and get_exit_criterion(latent_step).threshold == 1e-4
    with pytest.raises(ExitError, match="already registered"):
        register_exit_criterion(latent_step, default_threshold=1.0, needs=("latent",))(lambda s, i: i)
    with pytest.raises(ExitError, match=r"needs unknown input\(s\) \['hidden'\]; a criterion may need logits"):
        register_exit_criterion("test-bad", default_threshold=1.0, needs=("hidden",))(lambda s, i: i)
    with pytest.raises(ExitError, match="needs a threshold >= 2"):
        register_exit_criterion("test-low", default_threshold=1, needs=(), min_threshold=2)(lambda s, i: i)
    assert "test-bad" not in CRITERIA and "test-low" not in CRITERIA
    crit = get_exit_criterion(latent_step)
    crit.reset(2)
    with pytest.raises(ExitError, match="needs latent, and the caller passed none"):
        crit.update(logits=np.zeros((2, 4)))
