"""The recurrent model on both backends against an independent numpy transcription of Huginn."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diptych.core.hf import load_hf_folder, save_hf_folder
from diptych.core.recurrent_spec import RecurrentSpec, initial_state_noise, tiny_recurrent_spec
from diptych.core.spec import SpecError
from tests.conftest import needs_jax, needs_torch
from tests.recurrent.helpers import batch, spec_and_weights
from tests.recurrent.huginn_numpy_ref import huginn_forward


def test_param_names_follow_huginn_checkpoint():
    spec = tiny_recurrent_spec()
    names = spec.param_shapes()
    assert "transformer.wte.weight" in names and "transformer.ln_f.weight" in names
    assert names["transformer.adapter.weight"] == (64, 128)
    assert names["transformer.core_block.1.attn.Wqkv.weight"] == (3 * 64, 64)
    assert names["transformer.prelude.0.attn.qk_bias"] == (2, 1, 4, 16)
    assert names["transformer.coda.0.mlp.fc.weight"] == (256, 64)
    assert {f"transformer.coda.0.norm_{i}.weight" for i in range(1, 5)} <= set(names)
    assert "lm_head.weight" not in names  # tied
    assert "lm_head.weight" in tiny_recurrent_spec(tie_embeddings=False).param_shapes()


def test_init_is_seeded_and_follows_takase_scales():
    spec = tiny_recurrent_spec(n_embd=256, n_heads=4, intermediate_size=64)
    a, b = spec.init_weights(3), spec.init_weights(3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["transformer.adapter.weight"], spec.init_weights(4)["transformer.adapter.weight"])
    std = np.sqrt(2 / (5 * 256))
    assert abs(a["transformer.core_block.0.attn.Wqkv.weight"].std() / std - 1) < 0.05
    out_std = std / np.sqrt(2 * spec.effective_expected_depth)
    assert abs(a["transformer.core_block.0.attn.proj.weight"].std() / out_std - 1) < 0.05
    assert np.all(a["transformer.core_block.0.norm_4.weight"] == 1)
    assert np.all(a["transformer.coda.0.attn.qk_bias"] == 0)


def test_initial_state_noise_is_truncated_and_scaled():
    spec = tiny_recurrent_spec()
    s = initial_state_noise(spec, (4, 50, 64), np.random.default_rng(0))
    std = spec.init_values["std"] * spec.embed_scale
    assert np.abs(s).max() <= 3 * std + 1e-6
    assert abs(s.std() / (std * 0.986) - 1) < 0.05  # a normal cut at 3 sigma keeps 98.6% of its std
    assert np.array_equal(s, initial_state_noise(spec, (4, 50, 64), np.random.default_rng(0)))
    assert not initial_state_noise(spec, (2, 3, 64), np.random.default_rng(0), scale=0).any()


@pytest.mark.parametrize("num_steps", [0, 1, 5])
def test_logits_match_numpy_huginn_reference(backend, num_steps):
    spec, w = spec_and_weights()
    tokens, mask, _ = batch()
    s0 = initial_state_noise(spec, (*tokens.shape, spec.n_embd), np.random.default_rng(1))
    model = backend.build(spec, w)
    for m, init in ((None, None), (mask, s0)):
        got = backend.to_numpy(backend.forward(model, backend.from_numpy(tokens), m, num_steps=num_steps,
                                               init_state=init))
        ref = huginn_forward(spec, w, tokens, num_steps, init, attention_mask=m)
        live = np.ones(tokens.shape, bool) if m is None else m.astype(bool)
        assert got.dtype == np.float32 and got.shape == (2, 6, 128)
        np.testing.assert_allclose(got[live], ref[live], atol=1e-5, rtol=0)


def test_left_padding_gives_the_same_numbers_as_the_unpadded_row(backend):
    spec, w = spec_and_weights(tie_embeddings=False, bias=True)
    tokens, mask, _ = batch()
    model = backend.build(spec, w)
    full = backend.to_numpy(backend.forward(model, tokens, mask, num_steps=3))
    alone = backend.to_numpy(backend.forward(model, tokens[:1, 2:], None, num_steps=3))
    np.testing.assert_allclose(full[0, 2:], alone[0], atol=1e-5)
    assert np.isfinite(full).all()


def test_export_round_trips_and_folder_loads_in_huginn_format(backend, tmp_path):
    spec, w = spec_and_weights()
    model = backend.build(spec, w)
    exported = backend.export(model)
    assert set(exported) == set(w) and all(np.array_equal(exported[k], w[k]) for k in w)
    save_hf_folder(tmp_path / "ckpt", spec, exported)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["model_type"] == "huginn_raven" and cfg["n_layers_in_recurrent_block"] == 2
    spec2, w2 = load_hf_folder(tmp_path / "ckpt")
    assert isinstance(spec2, RecurrentSpec) and spec2 == spec and spec2.init_values == spec.init_values
    tokens, mask, _ = batch()
    a = backend.to_numpy(backend.forward(model, tokens, mask, num_steps=2))
    b = backend.to_numpy(backend.forward(backend.build(spec2, w2), tokens, mask, num_steps=2))
    np.testing.assert_array_equal(a, b)


def test_reads_a_huginn_0125_style_config_with_tied_lm_head_saved(tmp_path):
    """Huginn-0125's config.json fields (scaled down) and a safetensors that also stores lm_head."""
    from safetensors.numpy import save_file

    cfg = {
        "architectures": ["RavenForCausalLM"], "auto_map": {"AutoConfig": "raven_config_minimal.RavenConfig"},
        "bias": False, "block_size": 256, "effective_expected_depth": 132, "head_dim": 16,
        "init_orthogonal": False, "init_strategy": "takase",
        "init_values": {"embed_scale": 8.0, "embedding": 0.079, "out_proj": 0.0049, "std": 0.079},
        "injection_type": "linear", "intermediate_size": 96, "mean_backprop_depth": 8, "mean_recurrence": 32,
        "mlp_class_name": "GatedMLP", "model_type": "huginn_raven", "n_embd": 64, "n_heads": 4, "n_layers": 8,
        "n_layers_in_coda": 2, "n_layers_in_prelude": 2, "n_layers_in_recurrent_block": 4,
        "nonlin_name": "SiLU", "norm_class_name": "RMSNorm_llama", "norm_eps": 1e-06, "num_key_value_heads": 4,
        "padded_vocab_size": 160, "padding_multiple": 32, "qk_bias": True, "rope_base": 50000,
        "sampling_scheme": "poisson-lognormal-filling", "state_init": "like-init", "test_time_noise": 0,
        "test_time_noise_type": "fixed", "tie_embeddings": True, "tie_word_embeddings": True,
        "transformers_version": "4.47.1", "vocab_size": 150,
    }
    spec = RecurrentSpec.from_hf_config(cfg)
    assert (spec.n_embd, spec.padded_vocab_size, spec.embed_scale, spec.n_layers_in_prelude) == (64, 160, 8.0, 2)
    w = spec.init_weights(0)
    folder = tmp_path / "huginn"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({**w, "lm_head.weight": w["transformer.wte.weight"]}, str(folder / "model.safetensors"))
    spec2, w2 = load_hf_folder(folder)
    assert spec2 == spec and set(w2) == set(w)


def test_bad_configs_and_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(SpecError, match="mean_backprop_depth must be >= 1"):
        tiny_recurrent_spec(mean_backprop_depth=0)
    with pytest.raises(SpecError, match="mean_recurrence must be >= 1"):
        tiny_recurrent_spec(mean_recurrence=0)
    with pytest.raises(SpecError, match="num_key_value_heads == n_heads"):
        tiny_recurrent_spec(num_key_value_heads=2)
    with pytest.raises(SpecError, match="injection_type"):
        RecurrentSpec.from_hf_config({"model_type": "huginn_raven", "injection_type": "add"})
    spec, w = spec_and_weights()
    w["transformer.adapter.weight"] = np.zeros((64, 64), np.float32)
    with pytest.raises(SpecError, match=r"transformer.adapter.weight: checkpoint has shape \(64, 64\)"):
        spec.validate_weights(w)


@needs_torch
@needs_jax
def test_bf16_forward_runs_and_stays_close_on_both_backends():
    from diptych.core.backend import get_backend

    spec, w = spec_and_weights()
    tokens, mask, _ = batch()
    ref = huginn_forward(spec, w, tokens, 2, attention_mask=mask)
    for name in ("jax", "torch"):
        be = get_backend(name)
        out = be.to_numpy(be.forward(be.build(spec, w, dtype="bfloat16"), tokens, mask, num_steps=2))
        assert np.abs(out - ref)[mask.astype(bool)].max() < 0.15, name


@pytest.mark.parametrize("kw,match", [
    (dict(num_steps=4, num_grad_steps=0), "num_grad_steps"),
    (dict(num_steps=-1), "num_steps must be >= 0"),
    (dict(num_steps=2, init_state=np.zeros((1, 2, 64), np.float32)), "init_state has shape"),
    (dict(num_steps=2, bogus=1), "bogus"),
])
def test_bad_forward_arguments_are_rejected(backend, kw, match):
    spec, w = spec_and_weights()
    tokens, mask, _ = batch()
    with pytest.raises((ValueError, TypeError), match=match):
        backend.forward(backend.build(spec, w), tokens, mask, **kw)
    with pytest.raises(ValueError, match="token ids"):
        backend.forward(backend.build(spec, w), np.full((1, 3), 500), None, num_steps=1)


def test_set_depth_is_the_default_and_hidden_states_times_head_are_the_logits(backend):
    import importlib

    rb = importlib.import_module(f"diptych.backends.{backend.name}.recurrent")
    spec, w = spec_and_weights()
    tokens, mask, _ = batch()
    model = backend.build(spec, w, num_steps=3, num_grad_steps=2)
    implicit = backend.to_numpy(backend.forward(model, tokens, mask))
    explicit = backend.to_numpy(backend.forward(model, tokens, mask, num_steps=3))
    np.testing.assert_allclose(implicit, explicit, atol=1e-6)
    hidden = backend.to_numpy(rb.hidden_states(model, tokens, mask))
    head = backend.to_numpy(rb.lm_head_weight(model))
    np.testing.assert_allclose(hidden @ head.T, implicit, atol=1e-4)
    with pytest.raises(ValueError, match="num_grad_steps"):
        rb.set_depth(model, 4, 0)
    with pytest.raises(TypeError, match="Unknown build option"):
        backend.build(spec, w, depth=3)


def test_specs_differing_only_in_embed_scale_do_not_share_a_compile(backend):
    """``embed_scale`` is read at trace time; before it took part in spec equality, the JAX jit cache served the
    second spec the first spec's compiled forward (same weights, same shapes) and its logits were wrong."""
    import dataclasses

    spec, w = spec_and_weights()
    other = dataclasses.replace(spec, init_values={**spec.init_values, "embed_scale": 1.0})
    assert other != spec
    tokens, _, _ = batch()
    for s in (spec, other):
        got = backend.to_numpy(backend.forward(backend.build(s, w), tokens, None, num_steps=2))
        np.testing.assert_allclose(got, huginn_forward(s, w, tokens, 2, None), atol=1e-5, rtol=0)
