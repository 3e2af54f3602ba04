"""Both samplers against transformers (greedy), each other (parity noise) and core's reference loop."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core import sampling as S
from diptych.core.backend import get_backend
from diptych.core.spec import tiny_spec
from tests.conftest import needs_jax, needs_torch, needs_transformers

PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11], [12, 13]]
MODEL_TYPES = ["llama", "qwen2", "qwen3"]


def make_spec(model_type: str = "llama", **kw):
    # a wider init than the default makes next-token distributions peaked enough for filters to bite
    return tiny_spec(model_type, initializer_range=0.1, **kw)


_MODELS: dict = {}


def built(backend_name: str, model_type: str = "llama"):
    key = (backend_name, model_type)
    if key not in _MODELS:
        spec = make_spec(model_type)
        _MODELS[key] = get_backend(backend_name).build(spec, spec.init_weights(0))
    return _MODELS[key]


REF_WIDTH = 80


def forward_next_logits(backend, model):
    """Core's reference sampler driven by the backend's plain (uncached) forward pass."""

    def next_logits(seqs):
        width = max(REF_WIDTH, *map(len, seqs))  # one width: JAX compiles its forward once
        tok = np.zeros((len(seqs), width), np.int32)
        mask = np.zeros_like(tok)
        for i, s in enumerate(seqs):
            tok[i, width - len(s):] = s
            mask[i, width - len(s):] = 1
        return backend.to_numpy(backend.forward(model, tok, mask))[:, -1]

    return next_logits


# -- greedy == transformers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_greedy(tmp_path_factory):
    """transformers' greedy continuations of PROMPTS (left-padded batch) per model type."""
    import torch
    import transformers

    from diptych.core.hf import save_hf_folder

    out = {}
    for model_type in MODEL_TYPES:
        spec = make_spec(model_type)
        folder = save_hf_folder(tmp_path_factory.mktemp(model_type) / "ckpt", spec, spec.init_weights(0))
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
        tok, mask = S.prepare_prompts(PROMPTS, S.SamplingConfig(pad_id=0), spec)
        with torch.no_grad():
            seq = hf.generate(input_ids=torch.tensor(tok, dtype=torch.long), attention_mask=torch.tensor(mask),
                              do_sample=False, max_new_tokens=24, pad_token_id=0, eos_token_id=None)
        out[model_type] = seq[:, tok.shape[1]:].numpy()
    return out


@needs_transformers
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_greedy_equals_transformers_generate(backend, model_type, hf_greedy):
    ro = backend.generate(built(backend.name, model_type), PROMPTS,
                          S.SamplingConfig(temperature=0, max_new_tokens=24, eos_ids=()))
    want = hf_greedy[model_type]
    assert want.shape == (4, 24)
    np.testing.assert_array_equal(ro.completion_tokens, want)
    assert ro.completion_mask.all() and ro.truncated.all() and (ro.lengths == 24).all()


# -- parity mode --------------------------------------------------------------------------------------
PARITY_CONFIGS = [
    S.SamplingConfig(temperature=0.7, top_k=12, max_new_tokens=64, n=2, eos_ids=()),
    S.SamplingConfig(temperature=1.3, top_p=0.8, min_p=0.05, max_new_tokens=64, n=2, eos_ids=()),
]


@needs_jax
@needs_torch
@pytest.mark.parametrize("cfg", PARITY_CONFIGS, ids=["temp-topk", "topp-minp"])
def test_parity_noise_gives_identical_tokens_on_jax_and_torch(cfg):
    rows = len(PROMPTS) * cfg.n
    u = S.parity_noise(rows, cfg.max_new_tokens, 128, seed=7)
    jx = get_backend("jax").generate(built("jax"), PROMPTS, cfg, noise=u)
    th = get_backend("torch").generate(built("torch"), PROMPTS, cfg, noise=u)
    np.testing.assert_array_equal(jx.completion_tokens, th.completion_tokens)
    np.testing.assert_allclose(jx.logprobs, th.logprobs, atol=1e-5)
    # the filters are really active: the same noise without them draws other tokens
    plain = S.SamplingConfig(temperature=cfg.temperature, max_new_tokens=64, n=2, eos_ids=())
    unfiltered = get_backend("torch").generate(built("torch"), PROMPTS, plain, noise=u)
    assert (unfiltered.completion_tokens != th.completion_tokens).any()


def test_sampler_matches_core_reference_loop_with_stops(backend):
    """Tokens, masks, lengths and truncation flags equal core's uncached reference sampler."""
    model = built(backend.name)
    greedy = backend.generate(model, PROMPTS, S.SamplingConfig(temperature=0, max_new_tokens=24, eos_ids=()))
    row0, row2 = greedy.completion_tokens[0], greedy.completion_tokens[2]
    eos = int(row0[3])  # row 0 must stop at its 4th token (or earlier, if that id came before)
    stop = (int(row2[4]), int(row2[5]))
    cfg = S.SamplingConfig(temperature=0, max_new_tokens=10, eos_ids=(eos,), stop_sequences=(stop,), pad_id=0)
    ro = backend.generate(model, PROMPTS, cfg)
    ref = S.reference_generate(forward_next_logits(backend, model), PROMPTS, cfg, model.spec)
    for name in ("completion_tokens", "completion_mask", "lengths", "truncated"):
        np.testing.assert_array_equal(getattr(ro, name), getattr(ref, name), err_msg=name)
    np.testing.assert_allclose(ro.logprobs, ref.logprobs, atol=1e-5)
    assert ro.lengths[0] <= 4 and ro.completion_tokens[0, ro.lengths[0] - 1] == eos and not ro.truncated[0]
    assert ro.lengths[2] <= 6 and not ro.truncated[2]
    assert (ro.completion_tokens[ro.completion_mask == 0] == 0).all()
    assert (ro.logprobs[ro.completion_mask == 0] == 0).all()


def test_sampled_tokens_match_core_reference_under_parity_noise(backend):
    cfg = PARITY_CONFIGS[1]
    model = built(backend.name)
    u = S.parity_noise(len(PROMPTS) * cfg.n, cfg.max_new_tokens, 128, seed=3)
    ro = backend.generate(model, PROMPTS, cfg, noise=u)
    ref = S.reference_generate(forward_next_logits(backend, model), PROMPTS, cfg, model.spec, noise=u)
    np.testing.assert_array_equal(ro.completion_tokens, ref.completion_tokens)
    # rows i*n .. i*n+n-1 belong to prompt i
    np.testing.assert_array_equal(ro.prompt_tokens[0], ro.prompt_tokens[1])
    assert (ro.prompt_tokens[2] != ro.prompt_tokens[1]).any()


def test_sampler_logprobs_equal_forward_pass_logprobs(backend):
    cfg = PARITY_CONFIGS[0]
    model = built(backend.name)
    u = S.parity_noise(len(PROMPTS) * cfg.n, cfg.max_new_tokens, 128, seed=11)
    ro = backend.generate(model, PROMPTS, cfg, noise=u)
    tokens, mask = ro.tokens, ro.attention_mask
    lp = backend.to_numpy(backend.logprobs(model, tokens[:, :-1], mask[:, :-1], tokens[:, 1:], cfg.temperature))
    p = ro.prompt_tokens.shape[1]
    recomputed = lp[:, p - 1:] * ro.completion_mask
    np.testing.assert_allclose(ro.logprobs, recomputed, atol=1e-5)


def test_seeded_normal_mode_is_reproducible(backend):
    cfg = PARITY_CONFIGS[0]
    model = built(backend.name)
    a = backend.generate(model, PROMPTS, cfg, seed=1)
    b = backend.generate(model, PROMPTS, cfg, seed=1)
    c = backend.generate(model, PROMPTS, cfg, seed=2)
    np.testing.assert_array_equal(a.completion_tokens, b.completion_tokens)
    assert (a.completion_tokens != c.completion_tokens).any()


def test_bad_inputs_raise_clear_errors(backend):
    model = built(backend.name)
    with pytest.raises(S.SamplingError, match="non-empty"):
        backend.generate(model, [], S.SamplingConfig())
    with pytest.raises(S.SamplingError, match="longer than the model context"):
        backend.generate(model, [[1] * 600], S.SamplingConfig())
    with pytest.raises(S.SamplingError, match="noise has shape"):
        backend.generate(model, PROMPTS, S.SamplingConfig(max_new_tokens=4), noise=np.full((4, 3, 128), 0.5))


@needs_jax
def test_jax_prompt_buckets_keep_recompiles_rare():
    from diptych.backends.jax import sampler as jax_sampler

    model, cfg = built("jax"), S.SamplingConfig(temperature=0, max_new_tokens=24, eos_ids=())
    backend = get_backend("jax")
    backend.generate(model, [[1, 2, 3]], cfg)
    before = jax_sampler._generate_jit._cache_size()
    for width in (1, 5, 9, 16):  # all in the 16-wide bucket, same batch size
        ro = backend.generate(model, [[7] * width], cfg)
        assert ro.prompt_tokens.shape == (1, width)  # the bucket padding is trimmed from the result
    assert jax_sampler._generate_jit._cache_size() == before
    backend.generate(model, [[7] * 17], cfg)
    assert jax_sampler._generate_jit._cache_size() == before + 1


@needs_torch
@pytest.mark.slow
def test_torch_compile_option_gives_the_same_tokens():
    cfg = S.SamplingConfig(temperature=0, max_new_tokens=8, eos_ids=())
    backend, model = get_backend("torch"), built("torch")
    eager = backend.generate(model, PROMPTS, cfg)
    compiled = backend.generate(model, PROMPTS, cfg, compile=True)  # a torch sampler keyword, not a config field
    np.testing.assert_array_equal(compiled.completion_tokens, eager.completion_tokens)
