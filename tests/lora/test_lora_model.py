"""LoRA layers on both backends: one canonical init, JAX == torch, the base bit for bit with adapters off, only
adapters trainable, recurrent-depth models, and one-line errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from diptych.core.backend import get_backend
from diptych.core.lora import (
    DEFAULT_TARGETS,
    RECURRENT_TARGETS,
    LoRAConfig,
    LoRAError,
    init_adapters,
    match_targets,
    merge_weights,
)
from tests.conftest import HAS_JAX, HAS_TORCH, needs_jax, needs_torch
from tests.lora.conftest import (
    BACKEND_NAMES,
    SMALL,
    batch,
    both_backends,
    build,
    lora_module,
    random_adapters,
    to_np,
)


# -- the canonical form (numpy) ------------------------------------------------------------------
def test_init_adapters_is_peft_kaiming_a_and_zero_b_deterministic_per_seed():
    shapes = {"m.q_proj": (16, 32), "m.o_proj": (32, 16)}
    cfg = LoRAConfig(r=4)
    a1, a2, other = init_adapters(shapes, cfg, 3), init_adapters(shapes, cfg, 3), init_adapters(shapes, cfg, 4)
    assert a1.keys() == {"m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight", "m.o_proj.lora_A.weight",
                         "m.o_proj.lora_B.weight"}
    for k in a1:
        np.testing.assert_array_equal(a1[k], a2[k])
        assert a1[k].dtype == np.float32
    assert not np.array_equal(a1["m.q_proj.lora_A.weight"], other["m.q_proj.lora_A.weight"])
    a = a1["m.q_proj.lora_A.weight"]
    assert a.shape == (4, 32) and a1["m.q_proj.lora_B.weight"].shape == (16, 4)
    bound = 1 / np.sqrt(32)  # kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3) * sqrt(3 / fan_in)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    assert not a1["m.o_proj.lora_B.weight"].any()
    # a module's draw does not depend on which other modules are targeted
    alone = init_adapters({"m.q_proj": (16, 32)}, cfg, 3)
    np.testing.assert_array_equal(alone["m.q_proj.lora_A.weight"], a)


def test_merge_weights_is_w_plus_scaling_b_a():
    rng = np.random.default_rng(0)
    w = {"l.weight": rng.standard_normal((6, 5)).astype(np.float32), "n.weight": np.ones(5, np.float32)}
    a, b = rng.standard_normal((2, 5)).astype(np.float32), rng.standard_normal((6, 2)).astype(np.float32)
    for cfg, scale in ((LoRAConfig(r=2, alpha=3.0), 1.5), (LoRAConfig(r=2, alpha=3.0, use_rslora=True),
                                                            3.0 / np.sqrt(2))):
        merged = merge_weights(w, {"l.lora_A.weight": a, "l.lora_B.weight": b}, cfg)
        np.testing.assert_allclose(merged["l.weight"], w["l.weight"] + scale * (b.astype(np.float64) @ a), atol=1e-6)
        np.testing.assert_array_equal(merged["n.weight"], w["n.weight"])


def test_match_targets_follows_peft_suffix_and_regex_rules():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
             "model.layers.0.mlp.up_proj"]
    assert match_targets(names, LoRAConfig(targets=("q_proj",))) == [names[0], names[2]]
    assert match_targets(names, LoRAConfig(targets=("self_attn.v_proj",))) == [names[1]]
    assert match_targets(names, LoRAConfig(targets=(r".*\.1\..*",))) == [names[2]]
    with pytest.raises(LoRAError, match=r"\['proj'\].*q_proj"):  # a suffix must be a whole component
        match_targets(names, LoRAConfig(targets=("q_proj", "proj")))


# -- decoders on both backends ---------------------------------------------------------------------
@both_backends
def test_both_backends_start_bit_identical_and_agree_with_nonzero_adapters(decoder):
    spec, weights = decoder
    models = {name: lora_module(name).apply_lora(build(name, spec, weights), SMALL, seed=7)
              for name in ("jax", "torch")}
    start = {name: lora_module(name).export_adapters(m) for name, m in models.items()}
    shapes = {k[: -len(".weight")]: weights[k].shape for k in weights
              if k.endswith("_proj.weight")}
    expected = init_adapters(shapes, SMALL, seed=7)
    for name in models:
        assert start[name].keys() == expected.keys()
        for k in expected:
            np.testing.assert_array_equal(start[name][k], expected[k], err_msg=f"{name} {k}")
    adapters = random_adapters(expected)
    tokens, mask = batch(spec.vocab_size)
    logits = {}
    for name, m in models.items():
        lora_module(name).load_adapters(m, adapters)
        logits[name] = to_np(get_backend(name).forward(m, tokens, mask))
    np.testing.assert_allclose(logits["jax"], logits["torch"], atol=1e-5, rtol=0)
    plain = to_np(get_backend("torch").forward(build("torch", spec, weights), tokens, mask))
    assert np.abs(logits["torch"] - plain).max() > 1e-2  # the adapters act
    # and the adapted model is the plain model of the merged weights
    merged = to_np(get_backend("torch").forward(build("torch", spec, merge_weights(weights, adapters, SMALL)),
                                                tokens, mask))
    np.testing.assert_allclose(logits["torch"], merged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_adapters_disabled_is_the_base_model_bit_for_bit(name, decoder):
    spec, weights = decoder
    backend, lora = get_backend(name), lora_module(name)
    tokens, mask = batch(spec.vocab_size)
    targets = np.roll(tokens, -1, axis=1)
    plain = build(name, spec, weights)
    base_logits = to_np(backend.forward(plain, tokens, mask))
    base_lp = to_np(backend.logprobs(plain, tokens, mask, targets))
    model = lora.apply_lora(build(name, spec, weights), SMALL, seed=0)
    lora.load_adapters(model, random_adapters(lora.export_adapters(model)))
    with lora.adapters_disabled(model) as same:
        assert same is model
        np.testing.assert_array_equal(to_np(backend.forward(model, tokens, mask)), base_logits)
        np.testing.assert_array_equal(to_np(backend.logprobs(model, tokens, mask, targets)), base_lp)
    assert np.abs(to_np(backend.logprobs(model, tokens, mask, targets)) - base_lp).max() > 1e-3  # on again
    for base in (lora.base_weights(model), backend.export(model)):
        assert base.keys() == weights.keys()
        for k in weights:
            np.testing.assert_array_equal(base[k], weights[k], err_msg=k)


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_generate_with_adapters_disabled_is_the_base_models(name, decoder):
    from diptych.core.sampling import SamplingConfig

    spec, weights = decoder
    backend, lora = get_backend(name), lora_module(name)
    greedy = SamplingConfig(max_new_tokens=4, temperature=0.0, eos_ids=())
    prompts = [[5, 9, 3], [7, 1]]
    base = backend.generate(build(name, spec, weights), prompts, greedy).completion_tokens
    model = lora.apply_lora(build(name, spec, weights), SMALL, seed=0)
    lora.load_adapters(model, random_adapters(lora.export_adapters(model), scale=1.0))
    with lora.adapters_disabled(model):
        np.testing.assert_array_equal(backend.generate(model, prompts, greedy).completion_tokens, base)
    assert not np.array_equal(backend.generate(model, prompts, greedy).completion_tokens, base)


@needs_torch
def test_torch_only_adapters_require_grad_and_get_gradient(decoder):
    import torch

    spec, weights = decoder
    lora = lora_module("torch")
    model = lora.apply_lora(build("torch", spec, weights), SMALL, seed=0)
    adapters = lora.export_adapters(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(adapters)
    assert len([n for n, p in model.named_parameters() if not p.requires_grad]) == len(weights)
    tokens, mask = batch(spec.vocab_size)
    lp = get_backend("torch").logprobs(model, tokens, mask, np.roll(tokens, -1, axis=1))
    (lp * torch.as_tensor(mask)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if ".lora_B." in n)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@needs_torch
@pytest.mark.parametrize("quantize_base", ["none", "nf4"])
def test_torch_state_dict_is_the_base_and_loads_back_strictly(decoder, quantize_base):
    spec, weights = decoder
    if quantize_base == "nf4" and not _nf4_available("torch"):
        pytest.skip("diptych.backends.torch.nf4 is not there yet")
    lora = lora_module("torch")
    model = lora.apply_lora(build("torch", spec, weights), LoRAConfig(r=4, quantize_base=quantize_base))
    adapters = random_adapters(lora.export_adapters(model))
    lora.load_adapters(model, adapters)
    state = model.state_dict()
    assert state.keys() == weights.keys()
    other = lora.apply_lora(build("torch", spec, weights), LoRAConfig(r=4, quantize_base=quantize_base),
                            adapters=adapters)
    other.load_state_dict(state, strict=True)  # no adapter keys needed; a dense weight into NF4 is re-quantised
    tokens, mask = batch(spec.vocab_size)
    forward = get_backend("torch").forward
    np.testing.assert_array_equal(to_np(forward(other, tokens, mask)), to_np(forward(model, tokens, mask)))


@needs_jax
def test_jax_nnx_params_are_exactly_the_adapters_and_get_gradient(decoder):
    import jax
    from flax import nnx

    spec, weights = decoder
    lora = lora_module("jax")
    model = lora.apply_lora(build("jax", spec, weights), SMALL, seed=0)
    adapters = lora.export_adapters(model)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert names == set(adapters)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens, mask = batch(spec.vocab_size)
    backend = get_backend("jax")

    def loss(p):
        m = nnx.merge(graphdef, p, rest)
        return (backend.logprobs(m, tokens, mask, np.roll(tokens, -1, axis=1)) * mask).sum()

    grads = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(jax.grad(loss)(params))}
    assert set(grads) == set(adapters)
    assert all(np.abs(grads[n]).sum() > 0 for n in grads if ".lora_B." in n)


@both_backends
def test_adapter_gradients_agree_across_backends(decoder):
    import jax
    import torch
    from flax import nnx

    spec, weights = decoder
    tokens, mask = batch(spec.vocab_size)
    targets = np.roll(tokens, -1, axis=1)
    adapters = random_adapters(init_adapters({k[:-7]: weights[k].shape for k in weights if k.endswith("_proj.weight")},
                                             SMALL))
    tm = lora_module("torch").apply_lora(build("torch", spec, weights), SMALL, adapters=adapters)
    (get_backend("torch").logprobs(tm, tokens, mask, targets) * torch.as_tensor(mask)).sum().backward()
    g_torch = {n: p.grad.numpy() for n, p in tm.named_parameters() if p.requires_grad}
    jm = lora_module("jax").apply_lora(build("jax", spec, weights), SMALL, adapters=adapters)
    graphdef, params, rest = nnx.split(jm, nnx.Param, ...)
    g = jax.grad(lambda p: (get_backend("jax").logprobs(nnx.merge(graphdef, p, rest), tokens, mask, targets)
                            * mask).sum())(params)
    g_jax = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(g)}
    assert g_jax.keys() == g_torch.keys()
    for n in g_jax:
        scale = max(np.abs(g_torch[n]).max(), 1e-6)
        assert np.abs(g_jax[n] - g_torch[n]).max() / scale < 1e-4, n


@needs_torch
def test_torch_dropout_acts_only_in_the_train_steps_context(decoder):
    """Not by ``module.training``: a torch module is in training mode by default, and sampling or scoring with it
    must not drop (tests/lora/test_lora_dropout.py covers the train step itself)."""
    spec, weights = decoder
    tokens, mask = batch(spec.vocab_size)
    lora = lora_module("torch")
    adapters = random_adapters(init_adapters({k[:-7]: weights[k].shape for k in weights if k.endswith("_proj.weight")},
                                             SMALL))
    plain = lora.apply_lora(build("torch", spec, weights), SMALL, adapters=adapters)
    dropped = lora.apply_lora(build("torch", spec, weights), LoRAConfig(r=4, alpha=8.0, dropout=0.5),
                              adapters=adapters)
    forward = get_backend("torch").forward
    want = to_np(forward(plain, tokens, mask))
    for mode in (dropped.eval, dropped.train):
        mode()
        np.testing.assert_array_equal(to_np(forward(dropped, tokens, mask)), want)
    with lora.training_dropout(dropped, 0):
        first = to_np(forward(dropped, tokens, mask))
        second = to_np(forward(dropped, tokens, mask))
    assert np.abs(first - second).max() > 1e-4 and np.abs(first - want).max() > 1e-4
    with lora.training_dropout(dropped, 0):
        np.testing.assert_array_equal(to_np(forward(dropped, tokens, mask)), first)  # the seed fixes the masks
    with lora.training_dropout(dropped, 0), lora.adapters_disabled(dropped):  # dropout only touches the adapter
        base = to_np(forward(build("torch", spec, weights), tokens, mask))
        np.testing.assert_array_equal(to_np(forward(dropped, tokens, mask)), base)


# -- recurrent-depth models ----------------------------------------------------------------------
@both_backends
def test_recurrent_default_targets_and_backends_agree(recurrent):
    spec, weights = recurrent
    tokens, mask = batch(spec.padded_vocab_size)
    cfg = LoRAConfig(r=4, alpha=8.0)
    assert cfg.targets == DEFAULT_TARGETS
    out, base, cfgs = {}, {}, {}
    for name in ("jax", "torch"):
        backend, lora = get_backend(name), lora_module(name)
        base[name] = to_np(backend.forward(build(name, spec, weights), tokens, mask, num_steps=3))
        model = lora.apply_lora(build(name, spec, weights), cfg, seed=3)
        cfgs[name] = lora.lora_config(model)
        start = lora.export_adapters(model)
        assert {".".join(k.split(".")[-4:-2]) for k in start} == {"attn.Wqkv", "attn.proj", "mlp.fc",
                                                                            "mlp.proj"}
        adapters = random_adapters(start)
        lora.load_adapters(model, adapters)
        out[name] = to_np(backend.forward(model, tokens, mask, num_steps=3))
        with lora.adapters_disabled(model):
            np.testing.assert_array_equal(to_np(backend.forward(model, tokens, mask, num_steps=3)), base[name])
        exported = backend.export(model)
        assert exported.keys() == weights.keys()
        for k in weights:
            np.testing.assert_array_equal(exported[k], weights[k], err_msg=f"{name} {k}")
        merged = lora.merged_weights(model)
        np.testing.assert_allclose(merged["transformer.core_block.0.attn.Wqkv.weight"],
                                   merge_weights(weights, adapters, cfg)["transformer.core_block.0.attn.Wqkv.weight"],
                                   atol=1e-6)
    assert cfgs["jax"] == cfgs["torch"] and cfgs["jax"].targets == RECURRENT_TARGETS
    np.testing.assert_allclose(out["jax"], out["torch"], atol=1e-5, rtol=0)
    assert np.abs(out["torch"] - base["torch"]).max() > 1e-2


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_recurrent_only_adapters_are_trainable(name, recurrent):
    spec, weights = recurrent
    lora = lora_module(name)
    model = lora.apply_lora(build(name, spec, weights), LoRAConfig(r=2, targets=("Wqkv",)), seed=0)
    adapters = lora.export_adapters(model)
    assert len(adapters) == 2 * sum(1 for k in weights if k.endswith("Wqkv.weight"))
    if name == "torch":
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    else:
        from flax import nnx

        from diptych.backends.jax.sharding import named_leaves

        trainable = set(named_leaves({"model": nnx.state(model, nnx.Param)}))
    assert trainable == set(adapters)


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_errors_are_one_clear_line(name, decoder, monkeypatch):
    spec, weights = decoder
    lora = lora_module(name)
    with pytest.raises(LoRAError, match=r"\['qproj'\] match no linear layer.*q_proj") as e:
        lora.apply_lora(build(name, spec, weights), LoRAConfig(targets=("qproj",)))
    assert "\n" not in str(e.value)
    smallest = min(min(weights[k].shape) for k in weights if k.endswith("_proj.weight"))
    with pytest.raises(LoRAError, match=rf"lora.r={smallest + 1} exceeds min\(in, out\)"):
        lora.apply_lora(build(name, spec, weights), LoRAConfig(r=smallest + 1))
    model = lora.apply_lora(build(name, spec, weights), SMALL)
    with pytest.raises(LoRAError, match="already has LoRA adapters"):
        lora.apply_lora(model, SMALL)
    monkeypatch.setitem(sys.modules, f"diptych.backends.{name}.nf4", None)  # as if the module were missing
    with pytest.raises(LoRAError, match=rf"quantize_base='nf4' needs .*diptych.backends.{name}.nf4.*pip install"):
        lora.apply_lora(build(name, spec, weights), LoRAConfig(r=4, quantize_base="nf4"))
    with pytest.raises(LoRAError, match="has no LoRA adapters"):
        lora.export_adapters(build(name, spec, weights))
    assert lora.lora_config(build(name, spec, weights)) is None
    with pytest.raises(LoRAError, match=r"A .* and B"):
        bad = lora.export_adapters(model)
        bad[next(iter(bad))] = np.zeros((3, 3), np.float32)
        lora.load_adapters(model, bad)


@needs_jax
def test_jax_dropout_acts_only_with_a_train_steps_key(decoder):
    """``apply_lora`` takes ``dropout > 0`` on JAX (it used to refuse it); without a key the model is exact."""
    spec, weights = decoder
    tokens, mask = batch(spec.vocab_size)
    lora = lora_module("jax")
    adapters = random_adapters(init_adapters({k[:-7]: weights[k].shape for k in weights if k.endswith("_proj.weight")},
                                             SMALL))
    plain = lora.apply_lora(build("jax", spec, weights), SMALL, adapters=adapters)
    dropped = lora.apply_lora(build("jax", spec, weights), LoRAConfig(r=4, alpha=8.0, dropout=0.5), adapters=adapters)
    forward = get_backend("jax").forward
    np.testing.assert_array_equal(to_np(forward(dropped, tokens, mask)), to_np(forward(plain, tokens, mask)))


# -- QLoRA: an NF4 base ----------------------------------------------------------------------------
@both_backends
def test_nf4_recurrent_model_agrees_across_backends(recurrent):
    if not (_nf4_available("jax") and _nf4_available("torch")):
        pytest.skip("the NF4 modules are not there yet")
    spec, weights = recurrent
    tokens, mask = batch(spec.padded_vocab_size)
    cfg = LoRAConfig(r=4, alpha=8.0, quantize_base="nf4")
    out = {}
    for name in ("jax", "torch"):
        lora = lora_module(name)
        model = lora.apply_lora(build(name, spec, weights), cfg, seed=3)
        # adapters of a moderate size: the random tiny recurrence amplifies float rounding (unmerged torch vs
        # merged JAX) to 1e-4 when B A is as large as the base itself
        lora.load_adapters(model, random_adapters(lora.export_adapters(model), scale=0.1))
        out[name] = to_np(get_backend(name).forward(model, tokens, mask, num_steps=3))
        exported = get_backend(name).export(model)
        core = "transformer.core_block.0.mlp.fc.weight"
        assert 0 < np.abs(exported[core] - weights[core]).max() < 0.2 * np.abs(weights[core]).max()  # NF4 error
    np.testing.assert_allclose(out["jax"], out["torch"], atol=1e-5, rtol=0)


def _nf4_available(name: str) -> bool:
    import importlib.util

    return (HAS_JAX if name == "jax" else HAS_TORCH) and importlib.util.find_spec(
        f"diptych.backends.{name}.nf4") is not None


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_nf4_base_matches_a_float_model_of_the_oracles_dequantised_weights(name, decoder):
    if not _nf4_available(name):
        pytest.skip(f"diptych.backends.{name}.nf4 is not there yet")
    from diptych.kernels.reference import nf4_dequantize, nf4_quantize

    spec, weights = decoder
    backend, lora = get_backend(name), lora_module(name)
    tokens, mask = batch(spec.vocab_size)
    for double_quant in (False, True):
        cfg = LoRAConfig(r=4, alpha=8.0, quantize_base="nf4", double_quant=double_quant)
        model = lora.apply_lora(build(name, spec, weights), cfg, seed=0)
        dense = lora.apply_lora(build(name, spec, weights), SMALL, seed=0)
        assert lora.nbytes(model) < 0.3 * lora.nbytes(dense)
        adapters = random_adapters(lora.export_adapters(model))
        lora.load_adapters(model, adapters)
        oracle = {k: (nf4_dequantize(nf4_quantize(v, 64, double_quant)).reshape(v.shape)
                      if k.endswith("_proj.weight") else v) for k, v in weights.items()}
        base = lora.base_weights(model)
        for k in weights:
            np.testing.assert_allclose(base[k], oracle[k], atol=1e-6, rtol=0, err_msg=k)
        reference = build(name, spec, merge_weights(oracle, adapters, cfg))
        np.testing.assert_allclose(to_np(backend.forward(model, tokens, mask)),
                                   to_np(backend.forward(reference, tokens, mask)), atol=1e-5, rtol=0)
        with lora.adapters_disabled(model):
            np.testing.assert_allclose(to_np(backend.forward(model, tokens, mask)),
                                       to_np(backend.forward(build(name, spec, oracle), tokens, mask)),
                                       atol=1e-5, rtol=0)
