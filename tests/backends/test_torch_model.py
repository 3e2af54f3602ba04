"""The torch decoder against transformers' own Llama / Qwen2 / Qwen3 (the oracle), and against itself.

Each tiny model is built from transformers' config classes with every weight (norms and
biases included) randomised, saved with ``save_pretrained`` and read back through
``diptych.core.hf.load_hf_folder``, so the test also proves the checkpoint path end to end.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from conftest import needs_torch, needs_transformers

pytestmark = [needs_torch, needs_transformers]

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from diptych.backends.torch import model as M  # noqa: E402
from diptych.core.backend import get_backend  # noqa: E402
from diptych.core.hf import load_hf_folder, save_hf_folder  # noqa: E402
from diptych.core.spec import SpecError, tiny_spec  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, rms_norm_eps=1e-6, max_position_embeddings=256)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={"rope_type": "default", "rope_theta": 50000.0})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    # head_dim 32 != hidden / heads, so q_dim (128) differs from hidden (64).
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
}


def npy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def hf_model(model_type: str, seed: int = 0):
    config_cls, model_cls, extra = CASES[model_type]
    config = getattr(transformers, config_cls)(**TINY, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p) if name.endswith("bias") else 0.05 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    return model


@pytest.fixture(scope="module", params=list(CASES))
def hf_and_ours(request, tmp_path_factory):
    """(HF model, spec, canonical weights loaded from the HF folder)."""
    hf = hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    spec, weights = load_hf_folder(folder)
    return hf, spec, weights


def left_padded_batch(vocab: int = 128, lengths=(9, 4, 7, 1), seed: int = 0):
    """Uneven rows, left padded with a nonzero pad token so a leak through padding would show."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    tokens = np.full((len(lengths), t), 3, np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for i, n in enumerate(lengths):
        tokens[i, t - n :] = rng.integers(0, vocab, n)
        mask[i, t - n :] = 1
    return tokens, mask


def hf_logits(hf, tokens, mask, dtype=torch.float32):
    if dtype != torch.float32:
        hf = copy.deepcopy(hf).to(dtype)  # casting in place and back would round the shared fixture
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask),
                 position_ids=torch.from_numpy(positions)).logits
    return out.float().numpy()


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_logits_match_transformers_on_left_padded_batch(hf_and_ours, dtype, tol):
    hf, spec, weights = hf_and_ours
    tokens, mask = left_padded_batch()
    ref = hf_logits(hf, tokens, mask, getattr(torch, dtype))
    ours = M.forward(M.build(spec, weights, dtype=dtype, device="cpu"), tokens, mask)
    assert ours.dtype == torch.float32 and ours.shape == (4, 9, 128)
    ours = npy(ours)
    real = mask.astype(bool)
    err = np.abs(ours - ref)[real].max()
    assert err <= tol, f"{spec.model_type} {dtype}: max abs error {err} > {tol}"
    assert np.isfinite(ours).all(), "fully padded query rows must not produce NaN"


def test_padding_does_not_change_a_row(hf_and_ours):
    _, spec, weights = hf_and_ours
    model = M.build(spec, weights, device="cpu")
    tokens, mask = left_padded_batch()
    batched = npy(M.forward(model, tokens, mask))
    alone = npy(M.forward(model, tokens[1:2, -4:]))
    np.testing.assert_allclose(batched[1, -4:], alone[0], atol=1e-5, rtol=0)


def test_export_loads_into_transformers_with_same_logits(hf_and_ours, tmp_path):
    hf, spec, weights = hf_and_ours
    model = M.build(spec, weights, device="cpu")
    save_hf_folder(tmp_path / "out", spec, M.export(model))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(back).__name__ == type(hf).__name__
    tokens, mask = left_padded_batch(seed=1)
    real = mask.astype(bool)
    np.testing.assert_array_equal(hf_logits(back, tokens, mask)[real], hf_logits(hf, tokens, mask)[real])
    np.testing.assert_allclose(hf_logits(back, tokens, mask)[real], npy(M.forward(model, tokens, mask))[real],
                               atol=1e-5, rtol=0)


def test_export_of_build_is_bit_exact(hf_and_ours):
    _, spec, weights = hf_and_ours
    out = M.export(M.build(spec, weights, device="cpu"))
    assert out.keys() == weights.keys()
    assert ("lm_head.weight" in out) == (not spec.tie_word_embeddings)
    for name, w in weights.items():
        assert out[name].dtype == np.float32
        np.testing.assert_array_equal(out[name], w, err_msg=name)


def test_bf16_build_rounds_weights_and_exports_float32():
    spec = tiny_spec("llama")
    weights = spec.init_weights(0)
    model = M.build(spec, weights, dtype="bfloat16", device="cpu")
    assert model.dtype == "bfloat16" and M.lm_head_weight(model).dtype == torch.bfloat16
    out = M.export(model)
    w = weights["model.layers.0.mlp.up_proj.weight"]
    expected = torch.from_numpy(w).bfloat16().float().numpy()
    np.testing.assert_array_equal(out["model.layers.0.mlp.up_proj.weight"], expected)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_log_softmax_of_forward(hf_and_ours, temperature):
    _, spec, weights = hf_and_ours
    model = M.build(spec, weights, device="cpu")
    tokens, mask = left_padded_batch()
    targets = np.random.default_rng(5).integers(0, spec.vocab_size, tokens.shape)
    logits = M.forward(model, tokens, mask).detach().double() / temperature
    expected = torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(targets)[..., None])[..., 0].numpy()
    got = M.logprobs(model, tokens, mask, targets, temperature)
    assert got.dtype == torch.float32 and got.shape == tokens.shape
    np.testing.assert_allclose(npy(got), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernels", ["reference", "chunked"])
def test_every_cpu_kernel_mode_gives_log_softmax_of_forward_and_its_gradient(kernels):
    """Both log-prob paths (picked at build time) equal autograd through full-logit log-softmax, values and grads."""
    spec = tiny_spec("qwen2")
    weights = spec.init_weights(3)
    tokens, mask = left_padded_batch()
    targets = torch.from_numpy(np.roll(tokens, -1, 1))
    coeff = torch.from_numpy(mask).float()

    naive = M.build(spec, weights, device="cpu")
    logp = torch.log_softmax(M.forward(naive, tokens, mask).double() / 0.5, -1).gather(-1, targets[..., None])[..., 0]
    (logp * coeff).sum().backward()
    model = M.build(spec, weights, kernels=kernels, device="cpu")
    assert model.kernels == kernels
    got = M.logprobs(model, tokens, mask, targets, 0.5)
    np.testing.assert_allclose(npy(got), logp.detach().numpy(), atol=1e-5, rtol=0)
    (got * coeff).sum().backward()
    for (name, p), q in zip(model.named_parameters(), naive.parameters()):
        rel = (p.grad - q.grad).abs().max() / q.grad.abs().max()
        assert rel <= 1e-4, f"{name}: gradient rel err {rel:.3g}"


def test_kv_cache_prefill_and_decode_reproduce_forward(hf_and_ours):
    _, spec, weights = hf_and_ours
    model = M.build(spec, weights, device="cpu")
    tokens, mask = left_padded_batch(lengths=(9, 4, 7, 2), seed=3)
    extra = np.random.default_rng(4).integers(0, spec.vocab_size, (4, 4))
    full_tokens = np.concatenate([tokens, extra], 1)
    full_mask = np.concatenate([mask, np.ones_like(extra)], 1)
    full = npy(M.forward(model, full_tokens, full_mask))

    b, prompt_len = tokens.shape
    max_len = prompt_len + extra.shape[1] + 3  # spare slots stay masked out
    cache = M.init_cache(model, b, max_len)
    assert cache.k.shape == (spec.num_hidden_layers, b, spec.num_key_value_heads, max_len, spec.head_dim)
    key_mask = np.zeros((b, max_len), np.int64)
    key_mask[:, :prompt_len] = mask
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    logits, cache = M.forward_cached(model, tokens, positions, cache, 0, key_mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(logits.numpy()[real], full[:, :prompt_len][real], atol=1e-5, rtol=0)
    next_pos = mask.sum(-1)
    for step in range(extra.shape[1]):
        slot = prompt_len + step
        key_mask[:, slot] = 1
        logits, cache = M.forward_cached(model, extra[:, step : step + 1], (next_pos + step)[:, None], cache, slot,
                                         key_mask)
        assert logits.shape == (b, 1, spec.vocab_size)
        np.testing.assert_allclose(logits.numpy()[:, 0], full[:, slot], atol=1e-5, rtol=0)


def test_cached_bf16_cache_is_model_dtype_and_overflow_is_an_error():
    spec = tiny_spec("qwen3")
    model = M.build(spec, spec.init_weights(1), dtype="bfloat16", device="cpu")
    cache = M.init_cache(model, 2, 4)
    assert cache.k.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="overflows the cache"):
        M.forward_cached(model, np.zeros((2, 3), np.int64), np.zeros((2, 3), np.int64), cache, 2, np.ones((2, 4)))


def test_gradients_flow_through_forward():
    spec = tiny_spec("qwen2")
    model = M.build(spec, spec.init_weights(0), device="cpu")
    tokens, mask = left_padded_batch()
    lp = M.logprobs(model, tokens, mask, np.roll(tokens, -1, 1))
    (lp * torch.from_numpy(mask)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0


def test_facade_build_forward_logprobs_export():
    be = get_backend("torch")
    spec = tiny_spec("llama")
    weights = spec.init_weights(0)
    model = be.build(spec, weights, dtype="float32")
    tokens, mask = left_padded_batch()
    logits = be.to_numpy(be.forward(model, tokens, mask))
    np.testing.assert_array_equal(logits, npy(M.forward(model, tokens, mask)))
    lp = be.to_numpy(be.logprobs(model, tokens, mask, tokens, 1.0))
    assert lp.shape == tokens.shape and (lp <= 0).all()
    assert be.export(model).keys() == weights.keys()


def test_build_rejects_bad_input_with_clear_errors():
    spec = tiny_spec("llama")
    weights = spec.init_weights(0)
    bad = dict(weights, **{"model.layers.1.mlp.up_proj.weight": np.zeros((64, 128), np.float32)})
    with pytest.raises(SpecError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(64, 128\).*\(128, 64\)"):
        M.build(spec, bad)
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16"):
        M.build(spec, weights, dtype="float16")
    with pytest.raises(ValueError, match="kernels must be one of"):
        M.build(spec, weights, kernels="fast")
    model = M.build(spec, weights, device="cpu")
    with pytest.raises(ValueError, match="attention_mask shape"):
        M.forward(model, np.zeros((2, 5), np.int64), np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"tokens must be \[batch, time\]"):
        M.forward(model, np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        M.logprobs(model, np.zeros((1, 3), np.int64), None, np.zeros((1, 3), np.int64), 0.0)
