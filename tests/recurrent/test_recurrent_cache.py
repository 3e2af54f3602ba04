"""The KV cache of recurrent-depth generation: exact at fixed depth, Huginn's "latest" fallback
under adaptive exit (per row, no leak across rows), padding masked, warm start, both backends."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core.sampling import SamplingConfig, parity_noise
from diptych.recurrent.exit import ExitContract, ExitCriterion
from tests.conftest import needs_jax, needs_torch
from tests.recurrent.helpers import spec_and_weights
from tests.recurrent.huginn_numpy_ref import huginn_generate_latest

PROMPTS = [[5, 6, 7, 8, 9], [9, 10], [1, 2, 3]]  # different lengths: rows 1 and 2 are left-padded
GREEDY = SamplingConfig(max_new_tokens=5, temperature=0, eos_ids=())


def scripted_exit(depths: np.ndarray) -> ExitCriterion:
    """Row b exits generated token t at iteration ``depths[b, t]``: different depths per row, no thresholds."""
    seen = {"token": 0}

    def fn(state, inputs):
        if "it" not in state:
            seen["token"] += 1  # first iteration of the next generated token (prefill never asks)
        state["it"] = state.get("it", 0) + 1
        return (state["it"] >= depths[:, seen["token"]]).astype(np.float64)

    return ExitCriterion(ExitContract("scripted", fn, 0.5, needs=(), exits_when="at_least"))


DEPTHS = np.array([[6, 1, 4, 2, 6],  # column 0 (prefill) is ignored: it always runs the cap
                   [6, 3, 1, 5, 2],
                   [6, 2, 6, 1, 3]])


@pytest.fixture(scope="module")
def model_weights():
    return spec_and_weights(4)


def test_cached_equals_uncached_at_fixed_depth_with_left_padding(backend, model_weights):
    spec, w = model_weights
    model = backend.build(spec, w)
    cached = backend.generate(model, PROMPTS, GREEDY, num_steps=6, record_logits=True)
    plain = backend.generate(model, PROMPTS, GREEDY, num_steps=6, record_logits=True, cache=False)
    assert np.array_equal(cached.completion_tokens, plain.completion_tokens)
    np.testing.assert_allclose(cached.extras["logits"], plain.extras["logits"], atol=1e-5, rtol=0)
    assert (cached.extras["depth"] == 6).all()


def test_cached_adaptive_exit_matches_the_latest_fallback_oracle(backend, model_weights):
    spec, w = model_weights
    roll = backend.generate(backend.build(spec, w), PROMPTS, GREEDY, num_steps=6, exit_criterion=scripted_exit(DEPTHS),
                            record_logits=True)
    assert roll.extras["depth"].tolist() == DEPTHS.tolist()
    for b, prompt in enumerate(PROMPTS):  # the oracle sees each row alone and unpadded
        toks, logits, depths = huginn_generate_latest(spec, w, prompt, 5, 6, depth_of=DEPTHS[b].__getitem__)
        assert roll.completion_tokens[b].tolist() == toks.tolist()
        assert roll.extras["depth"][b].tolist() == depths.tolist()
        np.testing.assert_allclose(roll.extras["logits"][b], logits, atol=2e-5, rtol=0)
    # the fallback is what is being checked: iterating exited tokens on for their K/V gives other logits
    _, full, _ = huginn_generate_latest(spec, w, PROMPTS[0], 5, 6, depth_of=DEPTHS[0].__getitem__, fallback="full")
    assert np.abs(full[2:] - roll.extras["logits"][0, 2:]).max() > 1e-3


def test_one_rows_exit_never_changes_another_rows_output(backend, model_weights):
    spec, w = model_weights
    model = backend.build(spec, w)
    together = backend.generate(model, PROMPTS, GREEDY, num_steps=6, exit_criterion=scripted_exit(DEPTHS),
                                record_logits=True)
    for b, prompt in enumerate(PROMPTS):
        alone = backend.generate(model, [prompt], GREEDY, num_steps=6, exit_criterion=scripted_exit(DEPTHS[b:b + 1]),
                                 record_logits=True)
        assert alone.completion_tokens[0].tolist() == together.completion_tokens[b].tolist()
        np.testing.assert_allclose(alone.extras["logits"][0], together.extras["logits"][b], atol=1e-5, rtol=0)


def test_real_criterion_exits_at_the_oracles_depths(backend, model_weights):
    """latent-diff decides on the model's own latents: rows exit at different depths, as the oracle says."""
    spec, w = model_weights
    thr = 0.3
    roll = backend.generate(backend.build(spec, w), PROMPTS, GREEDY, num_steps=6, exit_criterion="latent-diff",
                            exit_threshold=thr, record_logits=True)
    for b, prompt in enumerate(PROMPTS):
        toks, logits, depths = huginn_generate_latest(spec, w, prompt, 5, 6, latent_diff=thr)
        assert roll.extras["depth"][b].tolist() == depths.tolist()
        assert roll.completion_tokens[b].tolist() == toks.tolist()
        np.testing.assert_allclose(roll.extras["logits"][b], logits, atol=2e-5, rtol=0)
    assert len(set(roll.extras["depth"][:, 1:].ravel().tolist())) > 1


def test_cached_warm_start_matches_oracle_and_differs_from_cold(backend, model_weights):
    spec, w = model_weights
    model = backend.build(spec, w)
    warm = backend.generate(model, PROMPTS, GREEDY, num_steps=6, warm_start=True, record_logits=True)
    cold = backend.generate(model, PROMPTS, GREEDY, num_steps=6, record_logits=True)
    for b, prompt in enumerate(PROMPTS):
        toks, logits, _ = huginn_generate_latest(spec, w, prompt, 5, 6, warm_start=True)
        np.testing.assert_allclose(warm.extras["logits"][b], logits, atol=2e-5, rtol=0)
        assert warm.completion_tokens[b].tolist() == toks.tolist()
    np.testing.assert_allclose(warm.extras["logits"][:, 0], cold.extras["logits"][:, 0], atol=1e-6)  # prefill: same
    assert np.abs(warm.extras["logits"][:, 1] - cold.extras["logits"][:, 1]).max() > 1e-2


@needs_jax
@needs_torch
def test_jax_and_torch_cached_generation_agree_in_parity_mode():
    from diptych.core.backend import available_backends, get_backend

    if not {"jax", "torch"} <= set(available_backends()):
        pytest.skip("needs both backends")
    spec, w = spec_and_weights(5)
    sampling = SamplingConfig(max_new_tokens=5, temperature=1.0, eos_ids=())
    noise = parity_noise(3, 5, spec.vocab_size, seed=11)
    out = {}
    for name in ("jax", "torch"):
        be = get_backend(name)
        out[name] = be.generate(be.build(spec, w), PROMPTS, sampling, noise=noise, num_steps=6, init_scale=1.0,
                                state_seed=2, exit_criterion="latent-diff", exit_threshold=0.5, record_logits=True)
    assert np.array_equal(out["jax"].completion_tokens, out["torch"].completion_tokens)
    assert np.array_equal(out["jax"].extras["depth"], out["torch"].extras["depth"])
    assert len(set(out["jax"].extras["depth"][:, 1:].ravel().tolist())) > 1
    np.testing.assert_allclose(out["jax"].extras["logits"], out["torch"].extras["logits"], atol=1e-5, rtol=0)


@needs_torch
def test_torch_entry_points_move_numpy_inputs_to_the_models_device():
    """On a "meta" model a forgotten transfer fails with a device mismatch; a moved one computes shapes
    (and only fails where a result is copied back to the host, which meta cannot do)."""
    import torch

    from diptych.backends.torch import recurrent as R

    spec, w = spec_and_weights(0)
    tok = np.array([[0, 0, 3, 4], [5, 6, 7, 8]])
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    meta = R.build(spec, w, device="meta")
    assert R.forward(meta, tok, mask, num_steps=2).device.type == "meta"
    assert R.logprobs(meta, tok, mask, tok, num_steps=2).device.type == "meta"
    assert R.latent_forward(meta, tok, mask, num_steps=2, init_state=np.zeros((2, 4, spec.n_embd), np.float32))[1]\
        .device.type == "meta"
    assert R.hidden_states(meta, tok, mask, num_steps=2).device.type == "meta"
    host_only = "meta tensor"  # the error of copying a meta result out, not "not on the expected device"
    with pytest.raises((NotImplementedError, RuntimeError), match=host_only):
        R.loss_grads(meta, tok, mask, tok, np.ones(tok.shape), num_steps=2, num_grad_steps=1)
    with pytest.raises((NotImplementedError, RuntimeError), match=host_only):
        R.TruncatedTrainer(meta).step(tok, mask, tok, np.ones(tok.shape), num_steps=2, num_grad_steps=1)
    for cache in (True, False):
        with pytest.raises((NotImplementedError, RuntimeError), match=host_only):
            R.generate(meta, [[1, 2], [3]], GREEDY, num_steps=2, cache=cache)
    with pytest.raises(RuntimeError, match="device"):  # the premise: a forgotten transfer (host RoPE tables) fails
        R._rope(torch.zeros(2, 4, spec.n_heads, spec.head_dim, device="meta"),
                R._rope_tables(torch.as_tensor(mask), spec.head_dim, spec.rope_base))
    cpu = R.build(spec, w, device="cpu")
    roll = R.generate(cpu, [[1, 2], [3]], GREEDY, num_steps=2)
    assert roll.completion_tokens.shape == (2, 5)


def test_warm_start_begins_each_token_at_the_previous_tokens_final_state(backend, model_weights):
    """Spy on the decoder: the state entering a token's first iteration is the state its predecessor ended in."""
    import importlib

    from diptych.recurrent.generate import generate

    spec, w = model_weights
    ops = importlib.import_module(f"diptych.backends.{backend.name}.recurrent")._Ops(backend.build(spec, w))
    first, final = [], []

    class Spy:  # no run_fixed: every iteration goes through step
        def __init__(self, dec):
            self.dec, self.spec = dec, spec

        def prefill(self, *a):
            logits, x = self.dec.prefill(*a)
            final.append(backend.to_numpy(x))
            return logits, x

        def step(self, ctx, x):
            if ctx.it == 0:
                first.append(backend.to_numpy(x))
            return self.dec.step(ctx, x)

        def logits_last(self, ctx, x):
            if ctx.it == 6:
                final.append(backend.to_numpy(x))
            return self.dec.logits_last(ctx, x)

        def __getattr__(self, name):
            if name == "run_fixed":
                raise AttributeError(name)
            return getattr(self.dec, name)

    class SpyOps:
        def __init__(self):
            self.spec = spec

        def decoder(self, *a):
            return Spy(ops.decoder(*a))

    generate(SpyOps(), PROMPTS, GREEDY, num_steps=6, warm_start=True)
    assert len(first) == 4 and len(final) == 5
    for t in range(4):
        np.testing.assert_array_equal(first[t], final[t])
    assert np.abs(final[1] - final[0]).max() > 1e-3  # states do move between tokens
