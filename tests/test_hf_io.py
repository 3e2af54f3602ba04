"""Local Hugging Face checkpoint folders: load what transformers saves, save what transformers loads.

The oracle is transformers itself: its ``save_pretrained`` writes the folders we read
(single-file, sharded, bf16) and its ``from_pretrained`` reads the folders we write.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import needs_torch, needs_transformers
from safetensors.numpy import load_file, save_file

from diptych.core.backend import BackendError, get_backend
from diptych.core.hf import load_hf_folder, read_safetensors, save_hf_folder
from diptych.core.spec import DecoderSpec, SpecError, tiny_spec

TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=256)
HF = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={"rope_type": "default", "rope_theta": 5e4})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
}


def hf_model(model_type: str, **overrides):
    import torch
    import transformers

    config_cls, model_cls, extra = HF[model_type]
    config = getattr(transformers, config_cls)(**{**TINY, **extra, **overrides})
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).eval()


def hf_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def assert_same_weights(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], tied: bool) -> None:
    expected = dict(theirs)
    if tied:
        np.testing.assert_array_equal(expected.pop("lm_head.weight"), expected["model.embed_tokens.weight"])
    assert ours.keys() == expected.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], expected[name], err_msg=name)


# -- loading what transformers saved ------------------------------------------------------------
@needs_torch
@needs_transformers
@pytest.mark.parametrize("model_type", list(HF))
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_load_transformers_folder_single_and_sharded(tmp_path, model_type, shard):
    hf = hf_model(model_type)
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    spec, weights = load_hf_folder(tmp_path)
    c = hf.config
    assert spec.model_type == model_type
    assert (spec.hidden_size, spec.num_hidden_layers, spec.num_attention_heads, spec.num_key_value_heads) == (
        c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads)
    assert spec.head_dim == {"qwen3": 32}.get(model_type, 16)
    assert spec.rope_theta == c.rope_parameters["rope_theta"]
    assert spec.attention_bias == (model_type == "qwen2") and spec.qk_norm == (model_type == "qwen3")
    assert spec.tie_word_embeddings == c.tie_word_embeddings
    assert all(w.dtype == np.float32 for w in weights.values())
    assert_same_weights(weights, hf_state(hf), spec.tie_word_embeddings)


@needs_torch
@needs_transformers
def test_bf16_checkpoint_is_widened_to_float32_exactly(tmp_path):
    import torch

    hf = hf_model("llama").to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    _, weights = load_hf_folder(tmp_path)
    assert all(w.dtype == np.float32 for w in weights.values())
    assert_same_weights(weights, hf_state(hf), tied=False)


# -- saving what transformers loads -------------------------------------------------------------
@needs_torch
@needs_transformers
@pytest.mark.parametrize("model_type", list(HF))
@pytest.mark.parametrize("max_shard_bytes", [None, 40_000])
def test_saved_folder_loads_in_transformers_and_back(tmp_path, model_type, max_shard_bytes):
    import transformers

    spec = tiny_spec(model_type, tie_word_embeddings=model_type == "qwen2", rope_theta=2e4,
                     **({"head_dim": 32} if model_type == "qwen3" else {}))
    weights = spec.init_weights(seed=3)
    # Make norms and biases non-trivial so a dropped or misnamed one would show.
    rng = np.random.default_rng(1)
    for name, w in weights.items():
        if w.ndim == 1:
            weights[name] = (w + rng.normal(0, 0.1, w.shape)).astype(np.float32)
    out = save_hf_folder(tmp_path / "ckpt", spec, weights, max_shard_bytes=max_shard_bytes)
    if max_shard_bytes:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(weights)
        assert len(set(index["weight_map"].values())) > 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(hf).__name__ == HF[model_type][1]
    assert hf.config.rope_parameters["rope_theta"] == 2e4
    assert_same_weights(weights, hf_state(hf), spec.tie_word_embeddings)
    spec2, weights2 = load_hf_folder(out)
    assert spec2 == spec
    assert_same_weights(weights2, weights, tied=False)


def test_save_replaces_an_existing_folder_and_leaves_no_temporaries(tmp_path):
    spec = tiny_spec("llama")
    save_hf_folder(tmp_path / "ckpt", spec, spec.init_weights(0), max_shard_bytes=40_000)
    save_hf_folder(tmp_path / "ckpt", spec, spec.init_weights(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    _, weights = load_hf_folder(tmp_path / "ckpt")
    np.testing.assert_array_equal(weights["model.norm.weight"], spec.init_weights(1)["model.norm.weight"])
    np.testing.assert_array_equal(weights["lm_head.weight"], spec.init_weights(1)["lm_head.weight"])


def test_spec_round_trips_through_hf_config():
    for model_type in HF:
        spec = tiny_spec(model_type, rope_theta=1e6, rms_norm_eps=1e-5, eos_token_id=[1, 2])
        assert DecoderSpec.from_hf_config(spec.to_hf_config()) == spec


def test_transformers_4_layout_rope_theta_is_read():
    cfg = tiny_spec("llama").to_hf_config()
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = 123.0
    assert DecoderSpec.from_hf_config(cfg).rope_theta == 123.0


# -- bad input: clear errors --------------------------------------------------------------------
@pytest.fixture
def good_folder(tmp_path):
    spec = tiny_spec("llama")
    return save_hf_folder(tmp_path / "ckpt", spec, spec.init_weights(0))


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_folder(tmp_path / "nope")


def test_missing_config_json(good_folder):
    (good_folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_hf_folder(good_folder)


def test_invalid_config_json(good_folder):
    (good_folder / "config.json").write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        load_hf_folder(good_folder)


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3"])
def test_unknown_model_type_names_it_and_the_supported_ones(good_folder, model_type):
    cfg = json.loads((good_folder / "config.json").read_text())
    cfg["model_type"] = model_type
    (good_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecError, match=rf"model_type '{model_type}'.*llama.*qwen2.*qwen3.*mistral.*smollm3"):
        load_hf_folder(good_folder)


def test_unsupported_rope_scaling_is_rejected(good_folder):
    cfg = json.loads((good_folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                              "long_factor": [2.0] * 8, "original_max_position_embeddings": 64}
    (good_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecError, match="'longrope' is not supported; diptych applies default, linear"):
        load_hf_folder(good_folder)


def test_rope_scaling_missing_a_field_names_it(good_folder):
    cfg = json.loads((good_folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "high_freq_factor": 4.0}
    (good_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecError, match="'llama3' needs \\['low_freq_factor'\\]"):
        load_hf_folder(good_folder)


def test_rope_scaling_round_trips_and_legacy_rope_scaling_wins():
    spec = tiny_spec("llama", rope_type="llama3", rope_theta=5e5, rope_parameters={
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    assert DecoderSpec.from_hf_config(spec.to_hf_config()) == spec
    cfg = tiny_spec("llama").to_hf_config()
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}  # a 4.x config: rope_scaling, legacy "type"
    got = DecoderSpec.from_hf_config(cfg)
    assert got.rope_type == "linear" and dict(got.rope_parameters)["factor"] == 2.0


def test_wrong_shape_names_the_parameter_and_both_shapes(good_folder):
    path = good_folder / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    save_file(tensors, str(path))
    with pytest.raises(SpecError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\(64, 64\).*\(32, 64\)"):
        load_hf_folder(good_folder)


def test_missing_and_unexpected_parameters_are_named(good_folder):
    path = good_folder / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.norm.weight"]
    save_file(tensors, str(path))
    with pytest.raises(SpecError, match=r"lack model\.norm\.weight"):
        load_hf_folder(good_folder)
    tensors["model.norm.weight"] = np.ones(64, np.float32)
    tensors["model.layers.7.mlp.up_proj.weight"] = np.ones((2, 2), np.float32)
    save_file(tensors, str(path))
    with pytest.raises(SpecError, match=r"unexpected parameters model\.layers\.7\.mlp\.up_proj\.weight.*"
                                        r"num_hidden_layers=8 \(the config says 2\)"):
        load_hf_folder(good_folder)


@pytest.mark.parametrize("model_type, extra, field", [
    ("llama", {"model.layers.0.self_attn.o_proj.bias": (64,), "model.layers.0.self_attn.q_proj.bias": (64,)},
     r"attention_bias=true \(transformers then puts a bias on q, k, v and o for llama\)"),
    ("qwen2", {"model.layers.0.self_attn.o_proj.bias": (64,)}, "qwen2 never has one"),
    ("llama", {"model.layers.0.self_attn.q_norm.weight": (16,)}, "model_type qwen3"),
    ("llama", {"lm_head.weight": (128, 64)}, "tie_word_embeddings=false"),
])
def test_unexpected_parameters_name_the_config_field_that_explains_them(tmp_path, model_type, extra, field):
    spec = tiny_spec(model_type, tie_word_embeddings=True)
    weights = spec.init_weights(0)
    with pytest.raises(SpecError, match=field):
        spec.validate_weights({**weights, **{k: np.zeros(v, np.float32) for k, v in extra.items()}})


@needs_transformers
def test_llama_with_attention_bias_loads_with_its_o_proj_bias(tmp_path):
    hf = hf_model("llama", attention_bias=True)
    assert "model.layers.0.self_attn.o_proj.bias" in hf.state_dict()
    hf.save_pretrained(tmp_path)
    spec, weights = load_hf_folder(tmp_path)
    assert spec.attention_bias and spec.o_bias
    assert_same_weights(weights, hf_state(hf), tied=False)


def test_missing_weights_file(good_folder):
    (good_folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json"):
        load_hf_folder(good_folder)


def test_missing_shard_is_named(tmp_path):
    spec = tiny_spec("llama")
    folder = save_hf_folder(tmp_path / "ckpt", spec, spec.init_weights(0), max_shard_bytes=40_000)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        read_safetensors(folder)


def test_save_refuses_weights_that_do_not_fit_the_spec(tmp_path):
    spec = tiny_spec("qwen3")
    weights = spec.init_weights(0)
    weights["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)
    with pytest.raises(SpecError, match=r"q_norm\.weight.*\(8,\).*\(16,\)"):
        save_hf_folder(tmp_path / "ckpt", spec, weights)
    assert not (tmp_path / "ckpt").exists()


def test_unknown_backend_name_is_a_clear_error():
    with pytest.raises(BackendError, match=r"Unknown backend 'tensorflow'; choices: jax, torch"):
        get_backend("tensorflow")


@needs_torch
def test_torch_backend_build_rejects_a_wrong_shape_with_both_shapes():
    spec = tiny_spec("qwen2")
    weights = spec.init_weights(0)
    weights["model.layers.0.self_attn.v_proj.bias"] = np.zeros(64, np.float32)
    with pytest.raises(SpecError, match=r"v_proj\.bias.*\(64,\).*\(32,\)"):
        get_backend("torch").build(spec, weights)


@needs_transformers
def test_folder_loads_into_either_backend_and_exports_back(tmp_path, backend):
    """Import and export of the canonical dict is lossless on each backend, for a transformers-saved folder."""
    hf_model("qwen3").save_pretrained(tmp_path)
    spec, weights = load_hf_folder(tmp_path)
    model = backend.build(spec, weights)
    out = backend.export(model)
    assert_same_weights(out, weights, tied=False)
    logits = backend.to_numpy(backend.forward(model, np.array([[0, 5, 7]]), np.array([[0, 1, 1]])))
    assert logits.shape == (1, 3, spec.vocab_size) and np.isfinite(logits).all()


def test_huginn_stale_head_dim_is_derived_with_a_warning():
    """Huginn's reference code ignores config.head_dim, so a value that disagrees with n_embd / n_heads
    loads (with a warning) as the model the reference builds, instead of being refused."""
    from diptych.core.recurrent_spec import RecurrentSpec, tiny_recurrent_spec

    spec = tiny_recurrent_spec()
    cfg = spec.to_hf_config()
    cfg["head_dim"] = spec.head_dim * 2
    with pytest.warns(UserWarning, match=rf"head_dim {spec.head_dim * 2} != n_embd / n_heads = {spec.head_dim}"):
        got = RecurrentSpec.from_hf_config(cfg)
    assert got == spec and got.head_dim == spec.n_embd // spec.n_heads
