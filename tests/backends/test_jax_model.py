"""The Flax NNX decoder against transformers' own Llama / Qwen2 / Qwen3 and against itself.

Oracles: transformers' ``*ForCausalLM`` (eager attention, explicit position ids), a numpy
log-softmax of our own logits, and the input weights themselves. One batch shape is used
throughout so JAX compiles each program once per model.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import needs_jax, needs_transformers

pytestmark = [needs_jax, needs_transformers]

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from diptych.backends.jax import model as M  # noqa: E402
from diptych.core.hf import load_hf_folder, save_hf_folder  # noqa: E402
from diptych.core.spec import SpecError, tiny_spec  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=64, rms_norm_eps=1e-6)
HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # Qwen3 with tied embeddings (as the small Qwen3 checkpoints are) and an explicit head_dim.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=True,
                                                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}
MODEL_TYPES = list(HF_CLASSES)

# Left-padded batch of uneven lengths 7, 4 and 1 (one shape for every test).
LENGTHS = (7, 4, 1)
T = max(LENGTHS)


def _batch(vocab: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(len(LENGTHS), T)).astype(np.int64)
    mask = np.zeros_like(tokens)
    for i, n in enumerate(LENGTHS):
        mask[i, T - n:] = 1
    tokens[mask == 0] = 0
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    return tokens, mask, positions


def _save_hf(model_type: str, initializer_range: float, folder) -> tuple:
    """A tiny random transformers model saved to ``folder`` and read back through diptych's loader."""
    cfg_name, cls_name, extra = HF_CLASSES[model_type]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**TINY, initializer_range=initializer_range, **extra)
    hf = getattr(transformers, cls_name)(cfg).eval()
    # Non-trivial norm weights and biases, so a missing scale or bias cannot pass unnoticed.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    hf.save_pretrained(folder)
    spec, weights = load_hf_folder(folder)
    return model_type, folder, spec, weights


@pytest.fixture(scope="module", params=MODEL_TYPES)
def hf_model(request, tmp_path_factory):
    """Initialised at std 0.2 (HF uses 0.02) so logits are O(1-10) and a wrong mask or RoPE shows clearly."""
    return _save_hf(request.param, 0.2, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module", params=MODEL_TYPES)
def hf_model_default_init(request, tmp_path_factory):
    """HF's own init (std 0.02): logits O(1), the scale DESIGN.md's absolute bf16 tolerance is written for."""
    return _save_hf(request.param, 0.02, tmp_path_factory.mktemp(request.param + "_default_init"))


def _hf_logits(folder, tokens, mask, positions, dtype=torch.float32) -> np.ndarray:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                           dtype=dtype).eval()
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask),
                 position_ids=torch.as_tensor(positions)).logits
    return out.float().numpy()


def _max_abs_on_real_tokens(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    m = mask.astype(bool)
    return float(np.max(np.abs(a[m] - b[m])))


# -- logits vs transformers ---------------------------------------------------------------------
def test_forward_matches_transformers_fp32_on_left_padded_batch(hf_model):
    _, folder, spec, weights = hf_model
    tokens, mask, positions = _batch()
    ref = _hf_logits(folder, tokens, mask, positions)
    ours = np.asarray(M.forward(M.build(spec, weights), tokens, mask))
    assert ours.dtype == np.float32 and ours.shape == (len(LENGTHS), T, spec.vocab_size)
    assert np.abs(ref[mask.astype(bool)]).max() > 2.0, "oracle logits too small for the test to discriminate"
    assert _max_abs_on_real_tokens(ours, ref, mask) <= 1e-5


def test_forward_matches_transformers_bf16_on_left_padded_batch(hf_model_default_init):
    _, folder, spec, weights = hf_model_default_init
    tokens, mask, positions = _batch()
    ref = _hf_logits(folder, tokens, mask, positions, torch.bfloat16)
    ours = np.asarray(M.forward(M.build(spec, weights, dtype="bfloat16"), tokens, mask))
    assert ours.dtype == np.float32
    assert _max_abs_on_real_tokens(ours, ref, mask) <= 2e-2


@pytest.mark.slow
def test_bf16_error_is_no_larger_than_transformers_own_bf16_error(hf_model):
    """With O(10) logits bf16 rounding alone exceeds 2e-2, so calibrate against HF's own bf16 run.

    Both bf16 models are measured against the fp32 oracle; ours may not be much worse.
    """
    _, folder, spec, weights = hf_model
    tokens, mask, positions = _batch()
    ref32 = _hf_logits(folder, tokens, mask, positions)
    hf_err = _max_abs_on_real_tokens(_hf_logits(folder, tokens, mask, positions, torch.bfloat16), ref32, mask)
    ours = np.asarray(M.forward(M.build(spec, weights, dtype="bfloat16"), tokens, mask))
    assert _max_abs_on_real_tokens(ours, ref32, mask) <= 1.5 * hf_err + 1e-3


def test_padded_row_equals_the_same_row_unpadded(hf_model):
    """Left padding is invisible: positions come from the mask, pads (here garbage ids) are never attended.

    Row 0 of the batch is unpadded; the same first 4 tokens, left-padded by 3 random tokens
    in row 1 of a second batch of the same shape (no recompile), must give the same logits.
    A fully padded row (row 2) must stay finite.
    """
    _, _, spec, weights = hf_model
    model = M.build(spec, weights)
    tokens, mask, _ = _batch()
    n = 4
    shifted, shifted_mask = tokens.copy(), mask.copy()
    shifted[1] = np.concatenate([np.random.default_rng(9).integers(1, spec.vocab_size, T - n), tokens[0, :n]])
    shifted_mask[1] = np.arange(T) >= T - n
    shifted_mask[2] = 0
    unpadded = np.asarray(M.forward(model, tokens, mask))
    padded = np.asarray(M.forward(model, shifted, shifted_mask))
    np.testing.assert_allclose(padded[1, T - n:], unpadded[0, :n], atol=1e-5, rtol=0)
    assert np.isfinite(padded).all()


# -- log-probs ----------------------------------------------------------------------------------
def _log_softmax_at(logits: np.ndarray, targets: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return np.take_along_axis(logp, targets[..., None], -1)[..., 0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_log_softmax_of_forward_logits(hf_model, temperature):
    _, _, spec, weights = hf_model
    model = M.build(spec, weights)
    tokens, mask, _ = _batch()
    targets = np.roll(tokens, -1, axis=1)
    expected = _log_softmax_at(np.asarray(M.forward(model, tokens, mask)), targets, temperature)
    got = np.asarray(M.logprobs(model, tokens, mask, targets, temperature))
    assert got.dtype == np.float32 and got.shape == tokens.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernels", ["reference", "chunked"])
def test_every_cpu_kernel_mode_gives_log_softmax_of_forward_logits(kernels):
    """Both log-prob paths, picked at build time or per call, equal a float64 numpy log-softmax."""
    spec = tiny_spec("qwen2")
    weights = spec.init_weights(3)
    tokens, mask, _ = _batch()
    targets = np.roll(tokens, -1, axis=1)
    expected = _log_softmax_at(np.asarray(M.forward(M.build(spec, weights), tokens, mask)), targets, 0.5)
    built = M.build(spec, weights, kernels=kernels)
    assert built.kernels == kernels
    np.testing.assert_allclose(np.asarray(M.logprobs(built, tokens, mask, targets, 0.5)), expected, atol=1e-5)
    per_call = M.logprobs(M.build(spec, weights), tokens, mask, targets, 0.5, kernels=kernels)
    np.testing.assert_allclose(np.asarray(per_call), expected, atol=1e-5)


def test_norms_stay_plain_unless_fused():
    """On CPU only an explicit ``fused`` switches RMSNorm to the Pallas kernel (auto resolves to chunked)."""
    spec = tiny_spec("qwen3")
    for kernels, fused in (("auto", False), ("reference", False), ("chunked", False), ("fused", True)):
        model = M.build(spec, spec.init_weights(0), kernels=kernels)
        assert model.model.norm.fused is fused and model.model.layers[0].self_attn.q_norm.fused is fused


def test_logprobs_gradient_matches_gradient_of_log_softmax_of_forward():
    """Every parameter's gradient through the default (auto = chunked on CPU) path equals the naive one."""
    from flax import nnx

    spec = tiny_spec("qwen2")
    model = M.build(spec, spec.init_weights(4))
    tokens, mask, _ = _batch()
    targets = np.roll(tokens, -1, axis=1)
    weight = jnp.asarray(mask, jnp.float32)

    def chunked(m):
        return jnp.sum(M.logprobs(m, tokens, mask, targets, 0.9) * weight)

    def naive(m):
        logp = jax.nn.log_softmax(M.forward(m, tokens, mask) / 0.9)
        return jnp.sum(jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], -1)[..., 0] * weight)

    got = dict(nnx.to_flat_state(nnx.grad(chunked)(model)))
    want = dict(nnx.to_flat_state(nnx.grad(naive)(model)))
    assert set(got) == set(want) and len(got) == len(spec.param_shapes())
    for path, g in want.items():
        assert float(jnp.abs(g[...]).max()) > 0, path
        np.testing.assert_allclose(np.asarray(got[path][...]), np.asarray(g[...]), atol=1e-5, rtol=1e-4,
                                   err_msg=str(path))


def test_logprobs_reject_bad_inputs():
    spec = tiny_spec("llama")
    model = M.build(spec, spec.init_weights(0))
    tokens, mask, _ = _batch()
    with pytest.raises(ValueError, match="temperature"):
        M.logprobs(model, tokens, mask, tokens, 0.0)
    with pytest.raises(ValueError, match="targets shape"):
        M.logprobs(model, tokens, mask, tokens[:, :-1])
    with pytest.raises(ValueError, match="kernels"):
        M.logprobs(model, tokens, mask, tokens, kernels="magic")
    with pytest.raises(ValueError, match=r"Token ids must lie in \[0, 128\)"):
        M.forward(model, tokens + 128, mask)
    with pytest.raises(ValueError, match="attention_mask shape"):
        M.forward(model, tokens, mask[:, :-1])
    with pytest.raises(TypeError, match="integer"):
        M.forward(model, tokens.astype(np.float32), mask)


# -- KV cache -----------------------------------------------------------------------------------
def test_prefill_then_decode_reproduces_full_forward(hf_model):
    _, _, spec, weights = hf_model
    model = M.build(spec, weights)
    tokens, mask, positions = _batch(seed=5)
    prompt_len, max_len = 4, 10
    full = np.asarray(M.forward(model, tokens, mask))

    step = jax.jit(lambda m, *a: M.forward_cached(m, *a))  # a caller's jit: write_index is traced
    cache = M.init_cache(model, len(LENGTHS), max_len)
    assert cache.k.shape == (spec.num_hidden_layers, len(LENGTHS), spec.num_key_value_heads, max_len, spec.head_dim)
    key_mask = np.zeros((len(LENGTHS), max_len), np.int32)
    key_mask[:, :T] = mask
    logits, cache = M.forward_cached(model, tokens[:, :prompt_len], positions[:, :prompt_len], cache, 0, key_mask)
    outs = [np.asarray(logits)]
    for i in range(prompt_len, T):
        logits, cache = step(model, tokens[:, i:i + 1], positions[:, i:i + 1], cache, i, key_mask)
        outs.append(np.asarray(logits))
    cached = np.concatenate(outs, axis=1)
    assert _max_abs_on_real_tokens(cached, full, mask) <= 1e-5


def test_forward_cached_refuses_to_overflow_the_cache():
    spec = tiny_spec("llama")
    model = M.build(spec, spec.init_weights(0))
    cache = M.init_cache(model, 1, 4)
    with pytest.raises(ValueError, match="overflows the cache"):
        M.forward_cached(model, np.ones((1, 2), np.int32), np.zeros((1, 2), np.int32), cache, 3, np.ones((1, 4)))


# -- weights in and out -------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_export_of_build_is_bit_exact(model_type):
    spec = tiny_spec(model_type, tie_word_embeddings=model_type == "qwen3")
    weights = spec.init_weights(7)
    exported = M.export(M.build(spec, weights))
    assert set(exported) == set(weights)
    assert ("lm_head.weight" in exported) == (not spec.tie_word_embeddings)
    for name, w in weights.items():
        assert exported[name].dtype == np.float32 and np.array_equal(exported[name], w), name


def test_bfloat16_build_stores_bfloat16_and_exports_float32():
    spec = tiny_spec("llama")
    weights = spec.init_weights(0)
    model = M.build(spec, weights, dtype="bfloat16")
    assert M.lm_head_weight(model).dtype == jnp.bfloat16
    assert M.hidden_states(model, np.ones((1, 3), np.int32)).dtype == jnp.bfloat16
    exported = M.export(model)
    bf16 = np.asarray(jnp.asarray(weights["lm_head.weight"], jnp.bfloat16).astype(jnp.float32))
    assert exported["lm_head.weight"].dtype == np.float32 and np.array_equal(exported["lm_head.weight"], bf16)


def test_export_loads_in_transformers_with_the_same_logits(hf_model, tmp_path):
    _, _, spec, weights = hf_model
    model = M.build(spec, weights)
    save_hf_folder(tmp_path / "out", spec, M.export(model))
    tokens, mask, positions = _batch()
    ref = _hf_logits(tmp_path / "out", tokens, mask, positions)
    assert _max_abs_on_real_tokens(np.asarray(M.forward(model, tokens, mask)), ref, mask) <= 1e-5


def test_build_names_the_parameter_and_both_shapes():
    spec = tiny_spec("llama")
    weights = spec.init_weights(0)
    weights["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(SpecError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(3, 3\).*\(128, 64\)"):
        M.build(spec, weights)
    with pytest.raises(ValueError, match="dtype"):
        M.build(spec, spec.init_weights(0), dtype="float16")


# -- through the facade -------------------------------------------------------------------------
def test_facade_build_forward_logprobs():
    from diptych.core.backend import get_backend

    be = get_backend("jax")
    spec = tiny_spec("qwen3")
    weights = spec.init_weights(0)
    model = be.build(spec, weights)
    tokens, mask, _ = _batch()
    logits = be.to_numpy(be.forward(model, tokens, mask))
    np.testing.assert_array_equal(logits, np.asarray(M.forward(model, tokens, mask)))
    lp = be.to_numpy(be.logprobs(model, tokens, mask, tokens, 1.0))
    np.testing.assert_allclose(lp, _log_softmax_at(logits, tokens, 1.0), atol=1e-5, rtol=0)
    assert all(np.array_equal(v, weights[k]) for k, v in be.export(model).items())
