"""Exit criteria and fixed / adaptive-depth generation on both backends."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core.sampling import SamplingConfig
from diptych.recurrent.exit import CRITERIA, ExitError, get_exit_criterion
from diptych.recurrent.generate import generate
from tests.conftest import needs_jax, needs_torch
from tests.recurrent.helpers import spec_and_weights


class ScriptedOps:
    """A fake backend whose row b reaches its fixed point at iteration n[b] - 1.

    State channel -1 counts the iterations a row actually ran (frozen rows stop counting);
    the rest is x* + max(n - 1 - it, 0) * d, so iteration n is the first that changes nothing.
    Logits are a fixed linear readout of the state, so logit-based criteria see the same.
    """

    def __init__(self, spec, n: list[int]):
        self.spec, self.n = spec, np.asarray(n)
        rng = np.random.default_rng(0)
        self.target = rng.standard_normal(spec.n_embd)
        self.d = rng.standard_normal(spec.n_embd)
        self.head = 0.02 * rng.standard_normal((spec.n_embd, spec.vocab_size))  # unsaturated softmax

    def prelude(self, tokens, mask):
        return {"T": tokens.shape[1]}

    def init(self, ctx, s0):
        x = np.zeros((len(self.n), ctx["T"], self.spec.n_embd + 1))
        x[..., :-1] = self.target + self.n[:, None, None] * self.d  # far from everything
        return x

    def step(self, ctx, x):
        it = x[..., -1:] + 1
        gap = np.maximum(self.n[:, None, None] - 1 - it, 0)
        return np.concatenate([self.target + gap * self.d, it], -1)

    def logits_last(self, ctx, x):
        return x[:, -1, :-1] @ self.head

    def latent_last(self, x):
        return x[:, -1, :-1]

    def select(self, keep, new, old):
        return np.where(keep[:, None, None], old, new)


@pytest.mark.parametrize("criterion", ["latent-diff", "kl", "entropy-diff"])
def test_exit_happens_exactly_where_the_state_stops_changing(criterion):
    spec, _ = spec_and_weights()
    ops = ScriptedOps(spec, n=[3, 6, 9])
    roll = generate(ops, [[1, 2], [3, 4], [5]], SamplingConfig(max_new_tokens=3, temperature=0, eos_ids=()),
                    num_steps=12, exit_criterion=criterion, cache=False)
    depth = roll.extras["depth"]
    assert depth[:, 0].tolist() == [12, 12, 12]  # prefill never exits early
    assert depth[:, 1:].tolist() == [[3, 3], [6, 6], [9, 9]]


def test_argmax_stability_exits_after_n_stable_iterations():
    spec, _ = spec_and_weights()
    ops = ScriptedOps(spec, n=[2, 4])
    roll = generate(ops, [[1], [2]], SamplingConfig(max_new_tokens=2, temperature=0, eos_ids=()), num_steps=20,
                    exit_criterion="argmax-stability", exit_threshold=3, cache=False)
    # argmax is fixed from iteration n-1 at the latest, so 3 more stable iterations end it by n + 2
    assert roll.extras["depth"][:, 0].tolist() == [20, 20]
    assert (roll.extras["depth"][:, 1] <= np.array([2, 4]) + 2).all()


def test_unknown_criterion_and_bad_thresholds_raise():
    with pytest.raises(ExitError, match="Unknown exit criterion 'cosine-ish'; choose one of kl, "):
        get_exit_criterion("cosine-ish")
    with pytest.raises(ExitError, match="finite number >= 0"):
        get_exit_criterion("kl", -1)
    with pytest.raises(ExitError, match=r"'argmax-stability' needs a threshold >= 1 \(a count of stable iterations\)"):
        get_exit_criterion("argmax-stability", 0)
    assert {n: get_exit_criterion(n).threshold for n in CRITERIA if n != "none"} == {
        "kl": 5e-4, "entropy-diff": 1e-3, "latent-diff": 0.03, "argmax-stability": 5}


def test_kl_criterion_matches_hand_computed_value():
    c = get_exit_criterion("kl")
    c.reset(1)
    latent = np.zeros((1, 4))
    logits = np.log(np.array([[0.7, 0.1, 0.1, 0.1]]))
    v1, _ = c.update(logits, latent)  # against uniform: KL(U || p)
    assert np.allclose(v1, (0.25 * np.log(0.25 / np.array([0.7, 0.1, 0.1, 0.1]))).sum())
    v2, passed = c.update(logits, latent)
    assert np.allclose(v2, 0) and passed.all()


def _stateless_core(seed=0):
    """Zero the adapter's state half: every iteration maps e to the same state, so s_1 == s_2."""
    spec, w = spec_and_weights(seed)
    w["transformer.adapter.weight"][:, : spec.n_embd] = 0.0
    return spec, w


def test_generate_on_real_model_fixed_depth_matches_forward_and_adaptive_exits_at_two(backend):
    spec, w = _stateless_core()
    model = backend.build(spec, w)
    prompts = [[5, 6, 7], [9, 10]]
    sampling = SamplingConfig(max_new_tokens=3, temperature=0, eos_ids=())
    fixed = backend.generate(model, prompts, sampling, num_steps=4)
    assert (fixed.extras["depth"] == 4).all()
    logits = backend.to_numpy(backend.forward(model, np.array([[5, 6, 7]]), None, num_steps=4))
    assert fixed.completion_tokens[0, 0] == int(np.argmax(logits[0, -1, : spec.vocab_size]))
    adaptive = backend.generate(model, prompts, sampling, num_steps=6, exit_criterion="latent-diff")
    assert adaptive.extras["depth"][:, 0].tolist() == [6, 6]
    assert (adaptive.extras["depth"][:, 1:] == 2).all()
    assert np.array_equal(adaptive.completion_tokens, fixed.completion_tokens)  # converged state, same tokens


@needs_jax
@needs_torch
def test_jax_and_torch_generate_the_same_tokens_and_depths():
    from diptych.core.backend import available_backends, get_backend

    if not {"jax", "torch"} <= set(available_backends()):
        pytest.skip("needs both backends")
    spec, w = spec_and_weights(3)
    sampling = SamplingConfig(max_new_tokens=4, temperature=0, eos_ids=())
    out = {}
    for name in ("jax", "torch"):
        be = get_backend(name)
        out[name] = be.generate(be.build(spec, w), [[1, 2, 3], [4]], sampling, num_steps=5,
                                exit_criterion="argmax-stability", exit_threshold=2, init_scale=1.0, state_seed=3)
    assert np.array_equal(out["jax"].completion_tokens, out["torch"].completion_tokens)
    assert np.array_equal(out["jax"].extras["depth"], out["torch"].extras["depth"])
    np.testing.assert_allclose(out["jax"].logprobs, out["torch"].logprobs, atol=1e-5)


def test_warm_start_runs_and_changes_nothing_when_the_core_ignores_its_state(backend):
    spec, w = _stateless_core(1)
    model = backend.build(spec, w)
    sampling = SamplingConfig(max_new_tokens=3, temperature=0, eos_ids=())
    cold = backend.generate(model, [[3, 4]], sampling, num_steps=3)
    warm = backend.generate(model, [[3, 4]], sampling, num_steps=3, warm_start=True)
    assert np.array_equal(cold.completion_tokens, warm.completion_tokens)
