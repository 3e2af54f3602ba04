"""The continuous-batching sampler against independent oracles: the synchronous native sampler (greedy), core's
numpy reference sampler (sampled, same numpy stream), ``backend.logprobs`` recomputation, a two-model cached
forward for the kept-K/V weight swap, the other backend, and JAX's compile counter.

One shape everywhere (SLOTS rows, prompts up to P tokens, N new tokens), so JAX compiles each program once.
"""

from __future__ import annotations

import importlib
from dataclasses import replace

import numpy as np
import pytest

from diptych.core.backend import get_backend
from diptych.core.sampling import SamplingConfig, SamplingError, log_softmax, reference_generate
from diptych.core.spec import tiny_spec
from diptych.rollout.continuous import ContinuousSampler, Finished
from tests.conftest import count_compiles, needs_jax, needs_torch

SLOTS, P, N = 3, 8, 8
PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23], [30], [40, 41, 42, 43, 44, 45, 46, 47]]
GREEDY = SamplingConfig(temperature=0, max_new_tokens=N, eos_ids=())
SAMPLED = SamplingConfig(temperature=0.7, top_k=40, top_p=0.95, max_new_tokens=N, eos_ids=())
SPEC = tiny_spec("llama", initializer_range=0.1)  # peaked next-token distributions: no near-ties in greedy
W0, W1 = SPEC.init_weights(0), SPEC.init_weights(1)

_MODELS: dict = {}


def built(name: str, weights: dict = W0, spec=SPEC, tag: str = "w0"):
    key = (name, spec.model_type, tag)
    if key not in _MODELS:
        _MODELS[key] = get_backend(name).build(spec, weights)
    return _MODELS[key]


def sampler(name: str, sampling: SamplingConfig, **kw) -> ContinuousSampler:
    kw.setdefault("slots", SLOTS)
    kw.setdefault("max_prompt_length", P)
    return ContinuousSampler(get_backend(name), built(name), sampling, **kw)


def drain(s: ContinuousSampler, limit: int = 200) -> list[Finished]:
    out: list[Finished] = []
    for _ in range(limit):
        if not (s.busy or s.waiting):
            return out
        out += s.step()
    raise AssertionError("the sampler did not drain")


def recomputed(backend, model, f: Finished, temperature: float) -> np.ndarray:
    """``backend.logprobs`` of the finished sequence: the trainer's recomputation of the behaviour log-probs."""
    seq = np.asarray(f.prompt_ids + f.tokens.tolist(), np.int64)[None]
    lp = backend.to_numpy(backend.logprobs(model, seq[:, :-1], np.ones_like(seq[:, :-1]), seq[:, 1:], temperature))
    return lp[0, len(f.prompt_ids) - 1:]


def kept_kv_logprobs(backend, m_old, m_new, f: Finished, split: int, temperature: float) -> np.ndarray:
    """What a sampler that keeps the K/V must compute: the first ``split`` completion tokens from ``m_old``, the
    rest from ``m_new`` attending to K/V that ``m_old`` wrote for the prompt and those tokens but the last (the
    last one is fed after the swap). Built on the model module's own ``forward_cached``, not the sampler's code."""
    mod = importlib.import_module(f"{backend.package}.model")
    fed = np.asarray(f.prompt_ids + f.tokens.tolist()[:-1], np.int64)
    old = len(f.prompt_ids) + split - 1  # fed tokens whose K/V the old weights wrote
    cache = mod.init_cache(m_old, 1, len(fed))
    key_mask = np.ones((1, len(fed)), np.int32)
    pos = np.arange(len(fed))[None]
    a, cache = mod.forward_cached(m_old, fed[None, :old], pos[:, :old], cache, 0, key_mask)
    b, cache = mod.forward_cached(m_new, fed[None, old:], pos[:, old:], cache, old, key_mask)
    logits = np.concatenate([backend.to_numpy(a), backend.to_numpy(b)], 1)[0, len(f.prompt_ids) - 1:]
    lp = log_softmax(logits / np.float32(temperature))
    return np.take_along_axis(lp, f.tokens[:, None], -1)[:, 0]


# -- no swap: the synchronous sampler's output ---------------------------------------------------------------------
def test_greedy_equals_native_sampler(backend):
    """All prompts at once into enough rows: the synchronous sampler's tokens and log-probs; an EOS that one row
    produces early ends that row (EOS included, not truncated) exactly as the synchronous sampler ends it."""
    prompts = PROMPTS[:SLOTS]
    ref = backend.generate(built(backend.name), prompts, GREEDY)
    got = sampler(backend.name, GREEDY).run(prompts)
    for i in range(SLOTS):
        np.testing.assert_array_equal(got[i].tokens, ref.completion_tokens[i])
        np.testing.assert_allclose(got[i].logprobs, ref.logprobs[i], atol=1e-5, rtol=0)
        assert got[i].truncated and got[i].versions.tolist() == [0] * N and got[i].prompt_ids == prompts[i]
    eos, stop = int(ref.completion_tokens[0, 2]), tuple(int(t) for t in ref.completion_tokens[1, 4:6])
    stopping = replace(GREEDY, eos_ids=(eos,), stop_sequences=(stop,))
    ref = backend.generate(built(backend.name), prompts, stopping)
    got = sampler(backend.name, stopping).run(prompts)
    for i in range(SLOTS):
        n = int(ref.lengths[i])
        np.testing.assert_array_equal(got[i].tokens, ref.completion_tokens[i, :n])
        assert got[i].truncated == bool(ref.truncated[i])
    assert len(got[0].tokens) <= 3 and not got[0].truncated
    assert len(got[1].tokens) <= 6 and not got[1].truncated


def test_sampled_tokens_follow_core_rule_and_logprobs_equal_recomputation(backend):
    """Sampled (temperature, top-k, top-p): with every row busy each step the numpy stream is drawn exactly as core's
    reference sampler draws it, so the tokens are the reference's; the behaviour log-probs equal ``backend.logprobs``
    of the finished sequences at the same temperature (the trainer's basis)."""
    prompts = PROMPTS[:SLOTS]
    model = built(backend.name)

    def next_logits(seqs):
        width = P + N
        tok = np.zeros((len(seqs), width), np.int64)
        mask = np.zeros_like(tok)
        for i, s in enumerate(seqs):
            tok[i, width - len(s):], mask[i, width - len(s):] = s, 1
        return backend.to_numpy(backend.forward(model, tok, mask))[:, -1]

    ref = reference_generate(next_logits, prompts, SAMPLED, SPEC, seed=7)
    got = sampler(backend.name, SAMPLED, seed=7).run(prompts)
    for i in range(SLOTS):
        np.testing.assert_array_equal(got[i].tokens, ref.completion_tokens[i])
        np.testing.assert_allclose(got[i].logprobs, recomputed(backend, model, got[i], 0.7), atol=1e-5, rtol=0)
    greedy = sampler(backend.name, GREEDY).run(prompts)
    assert any((got[i].tokens != greedy[i].tokens).any() for i in range(SLOTS)), "sampling drew the greedy path"


# -- continuous batching --------------------------------------------------------------------------------------------
def test_more_prompts_than_slots_each_row_as_if_alone(backend):
    """Eight prompts through three rows, some submitted mid-run, with an EOS so rows end at different steps: every
    request finishes exactly once, rows are refilled while others are in flight, and each row's tokens are what the
    synchronous sampler gives that prompt alone (a repeat admitted beside its twin shares the twin's prefill)."""
    model = built(backend.name)
    eos = int(backend.generate(model, [PROMPTS[0]], GREEDY).completion_tokens[0, 3])
    sampling = replace(GREEDY, eos_ids=(eos,))
    prompts = {f"r{i}": p for i, p in enumerate(PROMPTS)} | {"twin": PROMPTS[0]}
    order = ["r0", "twin", "r1", "r2"] + [f"r{i}" for i in range(3, len(PROMPTS))]
    s = sampler(backend.name, sampling)
    for r in order[:4]:
        s.submit(r, prompts[r])
    assert (s.busy, s.waiting) == (0, 4)
    finished: list[Finished] = []
    refilled = False
    for t in range(100):
        if t == 2:
            for r in order[4:]:
                s.submit(r, prompts[r])
        before = {r.request_id for r in s._rows if r is not None}
        finished += s.step()
        after = {r.request_id for r in s._rows if r is not None}
        refilled |= bool(before & after) and bool(after - before)  # a newcomer beside a row in flight
        assert s.busy <= SLOTS
        if t > 2 and not (s.busy or s.waiting):
            break
    ids = [f.request_id for f in finished]
    assert sorted(ids) == sorted(order) and len(set(ids)) == len(ids)
    assert refilled
    for f in finished:
        alone = backend.generate(model, [f.prompt_ids], sampling)
        np.testing.assert_array_equal(f.tokens, alone.completion_tokens[0, :alone.lengths[0]])
        np.testing.assert_allclose(f.logprobs, alone.logprobs[0, :alone.lengths[0]], atol=1e-5, rtol=0)
        assert f.truncated == bool(alone.truncated[0]) and f.prompt_ids == prompts[f.request_id]
    assert {len(f.tokens) for f in finished} != {N}, "no row ended early: the EOS was not exercised"


# -- weight swap mid-generation ------------------------------------------------------------------------------------
K = 3


def swapped_run(name: str, recompute_kv: bool) -> dict:
    """Four prompts, three rows: three rows in flight at the swap after K steps, one still waiting."""
    s = sampler(name, SAMPLED, seed=3, recompute_kv=recompute_kv)
    for i in range(SLOTS + 1):
        s.submit(i, PROMPTS[i])
    finished = []
    for _ in range(K):
        finished += s.step()
    assert s.version == 0 and s.busy == SLOTS and s.waiting == 1
    s.update_weights(W1, version=1)
    assert s.version == 1
    finished += drain(s)
    return {f.request_id: f for f in finished}


@pytest.mark.parametrize("recompute_kv", [False, True], ids=["kept-kv", "recomputed-kv"])
def test_weight_swap_mid_generation(backend, recompute_kv):
    """Rows in flight at the swap carry versions [0]*K + [1]*(N-K); their first K log-probs are version 0's, the
    rest version 1's attending to the version-0 K/V of the prefix (kept) or a clean version-1 forward (recomputed);
    the row admitted after the swap is version 1 throughout."""
    m0, m1 = built(backend.name), built(backend.name, W1, tag="w1")
    got = swapped_run(backend.name, recompute_kv)
    assert sorted(got) == list(range(SLOTS + 1))
    for i in range(SLOTS):
        f = got[i]
        assert f.versions.tolist() == [0] * K + [1] * (N - K)
        np.testing.assert_allclose(f.logprobs[:K], recomputed(backend, m0, f, 0.7)[:K], atol=1e-5, rtol=0)
        kept = kept_kv_logprobs(backend, m0, m1, f, K, 0.7)
        clean = recomputed(backend, m1, f, 0.7)
        assert np.abs(kept[K + 1:] - clean[K + 1:]).max() > 1e-3, "the oracles do not tell kept from recomputed K/V"
        np.testing.assert_allclose(f.logprobs[K:], (clean if recompute_kv else kept)[K:], atol=1e-5, rtol=0)
    late = got[SLOTS]
    assert late.versions.tolist() == [1] * N
    np.testing.assert_allclose(late.logprobs, recomputed(backend, m1, late, 0.7), atol=1e-5, rtol=0)


# -- JAX: compiled once ---------------------------------------------------------------------------------------------
@needs_jax
def test_jax_admissions_exits_and_weight_swaps_compile_nothing():
    """After one warm-up run (decode, both prefill widths, a swap), a second run with admissions into freed rows,
    exits at EOS and two weight swaps (kept and recomputed K/V) triggers no XLA compilation."""
    eos = int(get_backend("jax").generate(built("jax"), [PROMPTS[0]], GREEDY).completion_tokens[0, 3])
    sampling = replace(SAMPLED, eos_ids=(eos,))
    for recompute_kv in (True, False):
        s = sampler("jax", sampling, recompute_kv=recompute_kv)
        s.submit("warm", PROMPTS[0])
        s.submit("warm twin", PROMPTS[0])
        s.step()
        s.update_weights(W1, version=1)
        drain(s)
    s = sampler("jax", sampling, recompute_kv=True)
    with count_compiles() as compiles:
        for i, p in enumerate([PROMPTS[1], *PROMPTS]):  # a repeat admitted beside its twin: a cache row copied
            s.submit(i, p)
        finished = [f for _ in range(2) for f in s.step()]
        s.update_weights(W1, version=1)
        finished += [f for _ in range(3) for f in s.step()]
        s.recompute_kv = False
        s.update_weights(W0, version=2)
        finished += drain(s)
    assert len(compiles) == 0, f"{len(compiles)} compilations across admissions, exits and weight swaps"
    import jax.numpy as jnp

    with count_compiles() as fresh:
        (jnp.arange(11 * 13) * 3).block_until_ready()  # a shape nothing compiled before: the counter sees it
    assert len(fresh) > 0
    assert sorted(f.request_id for f in finished) == list(range(len(PROMPTS) + 1))
    assert {2} < {int(v) for f in finished for v in f.versions}


# -- the two panels ------------------------------------------------------------------------------------------------
@needs_jax
@needs_torch
@pytest.mark.parametrize("recompute_kv", [False, True], ids=["kept-kv", "recomputed-kv"])
def test_jax_equals_torch(recompute_kv):
    """The same swapped, continuously batched run on both panels: the same tokens (same numpy stream), versions and
    log-probs within 1e-5."""
    j, t = swapped_run("jax", recompute_kv), swapped_run("torch", recompute_kv)
    for i in j:
        np.testing.assert_array_equal(j[i].tokens, t[i].tokens)
        np.testing.assert_array_equal(j[i].versions, t[i].versions)
        np.testing.assert_allclose(j[i].logprobs, t[i].logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,model_type", [pytest.param("torch", "qwen3", marks=needs_torch),
                                             pytest.param("torch", "mistral", marks=needs_torch),
                                             pytest.param("jax", "mistral", marks=needs_jax),
                                             pytest.param("torch", "smollm3", marks=needs_torch)])
def test_families_greedy_equal_native_sampler(name, model_type):
    """qk-norm (Qwen3), a sliding window shorter than the rows (Mistral: each row's window counts its own positions)
    and NoPE layers (SmolLM3), with rows at different lengths through three slots."""
    spec = tiny_spec(model_type, initializer_range=0.1)
    b = get_backend(name)
    model = built(name, spec.init_weights(0), spec, tag="w0")
    s = ContinuousSampler(b, model, GREEDY, slots=SLOTS, max_prompt_length=P)
    got = s.run(PROMPTS)
    for i, p in enumerate(PROMPTS):
        alone = b.generate(model, [p], GREEDY)
        np.testing.assert_array_equal(got[i].tokens, alone.completion_tokens[0])
        np.testing.assert_allclose(got[i].logprobs, alone.logprobs[0], atol=1e-5, rtol=0)


def test_lora_model_samples_with_its_merged_weights(backend):
    """A LoRA model (nonzero adapters) samples what the synchronous sampler draws from it, and takes the merged
    weights ``export_weights`` gives as an update (here: the same weights again, so nothing changes)."""
    from diptych.core.lora import LoRAConfig

    lora = importlib.import_module(f"{backend.package}.lora")
    cfg = LoRAConfig(r=4, alpha=8.0)
    names = lora.export_adapters(lora.apply_lora(backend.build(SPEC, W0), cfg, seed=0))
    rng = np.random.default_rng(5)
    adapters = {k: (0.2 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in sorted(names.items())}
    model = lora.apply_lora(backend.build(SPEC, W0), cfg, adapters=adapters)
    prompts = PROMPTS[:SLOTS]
    ref = backend.generate(model, prompts, GREEDY)
    assert (ref.completion_tokens != backend.generate(built(backend.name), prompts, GREEDY).completion_tokens).any()
    s = ContinuousSampler(backend, model, GREEDY, slots=SLOTS, max_prompt_length=P)
    for i in range(SLOTS):
        s.submit(i, prompts[i])
    got = {f.request_id: f for f in s.step()}
    s.update_weights(backend.merged_weights(model), version=1)
    got.update({f.request_id: f for f in drain(s)})
    for i in range(SLOTS):
        np.testing.assert_array_equal(got[i].tokens, ref.completion_tokens[i])
        np.testing.assert_allclose(got[i].logprobs, ref.logprobs[i], atol=1e-5, rtol=0)
        assert got[i].versions.tolist() == [0] + [1] * (N - 1)


# -- refusals ------------------------------------------------------------------------------------------------------
@needs_torch
def test_refusals():
    from tests.recurrent.helpers import spec_and_weights

    b = get_backend("torch")
    rspec, rw = spec_and_weights(0)
    with pytest.raises(SamplingError, match=r"decoder models only.*synchronous native sampler"):
        ContinuousSampler(b, b.build(rspec, rw), GREEDY, slots=2, max_prompt_length=P)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(SamplingError, match=r"slots .* must be an integer >= 1"):
            sampler("torch", GREEDY, slots=bad)
    with pytest.raises(SamplingError, match="exceeds the model context"):
        sampler("torch", GREEDY, max_prompt_length=SPEC.max_position_embeddings)
    with pytest.raises(SamplingError, match="one completion per request"):
        sampler("torch", replace(GREEDY, n=2))
    s = sampler("torch", GREEDY)
    with pytest.raises(SamplingError, match="9 tokens, more than max_prompt_length=8"):
        s.submit("long", list(range(1, 10)))
    with pytest.raises(SamplingError, match="outside the vocabulary"):
        s.submit("oov", [SPEC.vocab_size])
    with pytest.raises(SamplingError, match="empty"):
        s.submit("empty", [])
    s.submit("a", [1, 2])
    with pytest.raises(SamplingError, match="already waiting or in flight"):
        s.submit("a", [3])
    with pytest.raises(SamplingError, match="version must be an integer"):
        s.update_weights(W1, version="1")
    with pytest.raises(ValueError, match="missing names"):
        s.update_weights({k: v for k, v in W1.items() if k != "model.norm.weight"}, version=1)
    assert s.version == 0 and s.waiting == 1
    assert [f.request_id for f in drain(s)] == ["a"]
