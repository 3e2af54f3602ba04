"""RoPE written once in numpy equals transformers' ``ROPE_INIT_FUNCTIONS`` and ``LlamaRotaryEmbedding``.

Each case is a config.json-style dict: the same dict builds the transformers config (the oracle) and
is read by ``diptych.core.rope``, so the test covers how the config is read as well as the formulas.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from diptych.core.rope import (
    ROPE_TYPES,
    apply_rope,
    dynamic_inv_freq,
    ignored_rope_keys,
    rope_cos_sin,
    rope_parameters,
    standardized_rope_dict,
)

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

BASE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=64,
            num_hidden_layers=1)
LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
CASES = {
    "default_llama": ("LlamaConfig", {"rope_theta": 10000.0, "max_position_embeddings": 256}),
    "default_qwen2_theta_1e6": ("Qwen2Config", {"rope_theta": 1e6, "head_dim": 32, "max_position_embeddings": 256}),
    "linear_legacy_type": ("LlamaConfig", {"rope_theta": 10000.0, "max_position_embeddings": 512,
                                           "rope_scaling": {"type": "linear", "factor": 4.0}}),
    "linear_partial_rotary": ("LlamaConfig", {"max_position_embeddings": 512, "partial_rotary_factor": 0.5,
                                              "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "dynamic": ("LlamaConfig", {"rope_theta": 10000.0, "max_position_embeddings": 128,
                                "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    "llama3_real_8b": ("LlamaConfig", {"rope_theta": 500000.0, "max_position_embeddings": 131072,
                                       "head_dim": 128, "rope_scaling": dict(LLAMA31)}),
    "llama3_small_context": ("LlamaConfig", {"rope_theta": 500000.0, "max_position_embeddings": 1024,
                                             "rope_scaling": {**LLAMA31, "factor": 32.0,
                                                              "original_max_position_embeddings": 128}}),
    "llama3_rope_parameters_5x": ("LlamaConfig", {"max_position_embeddings": 2048,
                                                  "rope_parameters": {**LLAMA31, "rope_theta": 50000.0,
                                                                      "high_freq_factor": 2.0,
                                                                      "original_max_position_embeddings": 256}}),
    "yarn_qwen_style": ("Qwen2Config", {"rope_theta": 1e6, "max_position_embeddings": 512,
                                        "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                         "original_max_position_embeddings": 128}}),
    "yarn_betas_no_truncate": ("MistralConfig", {"rope_theta": 10000.0, "max_position_embeddings": 1024,
                                                 "head_dim": 32,
                                                 "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16,
                                                                  "beta_slow": 2, "truncate": False,
                                                                  "original_max_position_embeddings": 128}}),
    "yarn_mscale_deepseek": ("LlamaConfig", {"rope_theta": 10000.0, "max_position_embeddings": 640,
                                             "rope_scaling": {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707,
                                                              "mscale_all_dim": 1.0,
                                                              "original_max_position_embeddings": 16}}),
    "yarn_attention_factor": ("LlamaConfig", {"max_position_embeddings": 512,
                                              "rope_scaling": {"rope_type": "yarn", "factor": 2.0,
                                                               "attention_factor": 0.8,
                                                               "original_max_position_embeddings": 256}}),
    # beta_slow's correction dim (22) lies past the last dim: transformers clamps the ramp to dim - 1
    "yarn_small_theta_clamped_range": ("LlamaConfig", {"rope_theta": 4.0, "max_position_embeddings": 512,
                                                       "head_dim": 16,
                                                       "rope_scaling": {"rope_type": "yarn", "factor": 2.0,
                                                                        "original_max_position_embeddings": 256}}),
    "yarn_original_from_max_pos": ("LlamaConfig", {"max_position_embeddings": 300,
                                                   "rope_scaling": {"rope_type": "yarn", "factor": 3.0}}),
    "longrope_phi3_top_level_original": ("LlamaConfig", {
        "max_position_embeddings": 1024, "original_max_position_embeddings": 256, "head_dim": 16,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0],
                         "long_factor": [1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0]}}),
}


def _hf_config(name: str, raw: dict):
    return getattr(transformers, name)(**BASE, **copy.deepcopy(raw))


def _hf_init(cfg, seq_len=None):
    rope_type = cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        inv, scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, None, seq_len=seq_len)
    return inv.double().numpy(), float(scaling)


def _close(ours, theirs, rtol=1e-6):
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_inv_freq_and_attention_scaling_match_transformers(case):
    name, raw = CASES[case]
    cfg = _hf_config(name, raw)
    want_inv, want_scaling = _hf_init(cfg)
    for source in ({**BASE, **raw}, cfg.to_dict(), cfg):  # a config.json, a 5.x dict, the config object
        p = rope_parameters(source)
        assert p.rope_type == cfg.rope_parameters["rope_type"]
        assert p.inv_freq.shape == want_inv.shape
        _close(p.inv_freq, want_inv)
        assert p.attention_scaling == pytest.approx(want_scaling, rel=1e-12)
        assert p.dynamic == (p.rope_type in ("dynamic", "longrope"))


def test_default_theta_of_the_model_class_applies_when_no_rope_theta_is_given():
    cfg = transformers.SmolLM3Config(**BASE, max_position_embeddings=256)
    assert cfg.rope_parameters["rope_theta"] == 2e6
    raw = {**BASE, "max_position_embeddings": 256}
    _close(rope_parameters(raw, default_theta=2e6).inv_freq, _hf_init(cfg)[0])
    assert rope_parameters(raw).theta == 10000.0


def test_proportional_pads_zero_frequencies_for_the_unrotated_tail():
    cfg = transformers.LlamaConfig(**BASE, max_position_embeddings=256,
                                   rope_parameters={"rope_type": "proportional", "rope_theta": 10000.0,
                                                    "partial_rotary_factor": 0.25, "factor": 2.0})
    inv, _ = ROPE_INIT_FUNCTIONS["proportional"](cfg, None)
    p = rope_parameters(cfg)
    _close(p.inv_freq, inv.double().numpy())
    assert p.rotated_width == 64 and np.count_nonzero(p.inv_freq) == 8


@pytest.mark.parametrize("seq_len", [100, 128, 129, 300, 1000])
def test_dynamic_ntk_at_any_length_matches_transformers_dynamic_update(seq_len):
    cfg = _hf_config(*CASES["dynamic"])
    p = rope_parameters(cfg)
    want, _ = _hf_init(cfg, seq_len=seq_len)
    _close(dynamic_inv_freq(p, seq_len), want)
    if seq_len > 128:  # beyond the original context the base really grows
        assert dynamic_inv_freq(p, seq_len)[-1] < p.inv_freq[-1]


def test_longrope_switches_to_long_factors_beyond_the_original_context():
    cfg = _hf_config(*CASES["longrope_phi3_top_level_original"])
    p = rope_parameters(cfg)
    assert p.fields["original_max_position_embeddings"] == 256
    for seq_len in (256, 257, 900):
        _close(dynamic_inv_freq(p, seq_len), _hf_init(cfg, seq_len=seq_len)[0])
    assert not np.allclose(dynamic_inv_freq(p, 256), dynamic_inv_freq(p, 257))


@pytest.mark.parametrize("case", ["llama3_small_context", "yarn_qwen_style", "yarn_mscale_deepseek", "dynamic",
                                  "linear_legacy_type", "longrope_phi3_top_level_original", "default_llama"])
def test_cos_sin_equal_the_rotary_module_beyond_the_original_context(case):
    cfg = _hf_config(*CASES[case])
    positions = np.array([[0, 1, 7, 127, 128, 129, 300, 511, 700], [3, 64, 200, 255, 256, 257, 400, 600, 701]])
    x = torch.zeros(2, positions.shape[1], 8, dtype=torch.float32)
    with torch.no_grad():
        # a fresh module per row: transformers' dynamic update caches the longest length it has seen
        want = [LlamaRotaryEmbedding(cfg)(x[i:i + 1], torch.tensor(positions[i:i + 1])) for i in range(2)]
    p = rope_parameters(cfg)
    for i in range(2):
        cos, sin = rope_cos_sin(p, positions[i])
        # transformers forms angles in float32: error ~ position * 6e-8
        np.testing.assert_allclose(cos, want[i][0][0].double().numpy(), atol=2e-4, rtol=0)
        np.testing.assert_allclose(sin, want[i][1][0].double().numpy(), atol=2e-4, rtol=0)


def test_apply_rope_equals_transformers_rotate_half_and_keeps_a_partial_tail():
    cfg = _hf_config(*CASES["llama3_small_context"])
    p = rope_parameters(cfg)
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 2, 3, 5, 64))
    cos, sin = rope_cos_sin(p, np.arange(5) + 300)
    want_q, want_k = apply_rotary_pos_emb(*(torch.tensor(a) for a in (q, k, cos[None], sin[None])))
    np.testing.assert_allclose(apply_rope(q, cos, sin), want_q.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(apply_rope(k, cos, sin), want_k.numpy(), rtol=1e-12, atol=1e-12)
    # the norm of each rotated pair is preserved, and a partial table leaves the tail untouched
    half = rope_parameters(_hf_config(*CASES["linear_partial_rotary"]))
    assert half.rotated_width == 32
    c, s = rope_cos_sin(half, np.arange(5))
    out = apply_rope(q, c, s)
    np.testing.assert_array_equal(out[..., 32:], q[..., 32:])
    np.testing.assert_allclose(np.linalg.norm(out[..., :32], axis=-1), np.linalg.norm(q[..., :32], axis=-1))


@pytest.mark.parametrize(("rope", "match"), [
    ({"rope_type": "ntk_by_parts", "factor": 2.0}, "Unknown rope_type 'ntk_by_parts'"),
    ({"rope_type": "linear"}, r"needs \['factor'\]"),
    ({"type": "dynamic", "factor": 0.5}, "factor >= 1"),
    ({**LLAMA31, "high_freq_factor": 1.0}, "high_freq_factor > low_freq_factor"),
    ({"rope_type": "yarn", "factor": 2.0, "beta_fast": 1, "beta_slow": 8}, "beta_fast >= beta_slow"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, "list of 32 numbers"),
    ({"rope_type": "linear", "factor": "2"}, "needs a number for 'factor'"),
])
def test_bad_rope_configs_fail_with_a_clear_message(rope, match):
    with pytest.raises(ValueError, match=match):
        rope_parameters({**BASE, "max_position_embeddings": 256, "rope_scaling": rope})


def test_nested_per_layer_rope_needs_a_layer_type():
    cfg = {**BASE, "layer_types": ["full_attention", "sliding_attention"],
           "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    with pytest.raises(ValueError, match="layer_type"):
        rope_parameters(cfg)
    assert rope_parameters(cfg, layer_type="full_attention").rope_type == "linear"
    assert rope_parameters(cfg, layer_type="sliding_attention").theta == 1e4


def test_ignored_keys_lists_what_the_rope_type_never_reads():
    assert ignored_rope_keys({"rope_scaling": {"rope_type": "default", "factor": 2.0}}) == ["factor"]
    assert ignored_rope_keys({"rope_scaling": {**LLAMA31, "mrope_section": [1, 2]}}) == ["mrope_section"]
    full_yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "attention_factor": 1.0,
                 "beta_fast": 32, "beta_slow": 1, "mscale": 1, "mscale_all_dim": 1, "truncate": True,
                 "rope_theta": 1e4, "partial_rotary_factor": 1.0}
    assert ignored_rope_keys({"rope_parameters": full_yarn}) == []
    shadowed = {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": {"rope_type": "default"}}
    assert ignored_rope_keys(shadowed) == ["rope_parameters (shadowed by rope_scaling)"]
    assert standardized_rope_dict(shadowed)["rope_type"] == "linear"
    assert set(ROPE_TYPES) <= set(ROPE_INIT_FUNCTIONS) | {"default"}
