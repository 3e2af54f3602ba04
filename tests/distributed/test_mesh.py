"""core/mesh: the mesh config, the partition rules by canonical name, and every check that runs before compute."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core import mesh as M
from diptych.core.mesh import MeshConfig, MeshError
from diptych.core.recurrent_spec import tiny_recurrent_spec
from diptych.core.spec import tiny_spec

SPECS = [tiny_spec("llama"), tiny_spec("llama", tie_word_embeddings=True), tiny_spec("qwen2"), tiny_spec("qwen3"),
         tiny_recurrent_spec(), tiny_recurrent_spec(tie_embeddings=False, bias=True)]


def test_parse_reads_the_cli_form_and_defaults_omitted_axes_to_one():
    assert MeshConfig.parse("fsdp=4,tensor=2") == MeshConfig(data=1, fsdp=4, tensor=2)
    assert MeshConfig.parse(" data=2 , fsdp=2 ") == MeshConfig(data=2, fsdp=2)
    assert MeshConfig.parse("").is_single
    assert MeshConfig.coerce({"fsdp": 8}).size == 8
    assert MeshConfig.coerce(None) == MeshConfig()
    assert str(MeshConfig(fsdp=4)) == "data=1,fsdp=4,tensor=1"
    assert MeshConfig.parse(str(MeshConfig(data=2, tensor=2))) == MeshConfig(data=2, tensor=2)


@pytest.mark.parametrize(("text", "words"), [("pipeline=2", "axis one of"), ("fsdp=x", "integer"),
                                             ("fsdp=0", ">= 1"), ("fsdp=2,fsdp=2", "twice"), ("fsdp", "axis=size")])
def test_bad_mesh_text_is_refused_with_what_to_write(text, words):
    with pytest.raises(MeshError, match=words):
        MeshConfig.parse(text)


def test_unknown_axis_in_a_config_mapping_is_refused():
    with pytest.raises(MeshError, match="Unknown mesh axes"):
        MeshConfig.coerce({"fsdp": 2, "pipe": 2})


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.model_type}")
def test_every_parameter_of_every_family_has_a_rule_of_its_rank(spec):
    shapes = spec.param_shapes()
    rules = M.spec_rules(spec, MeshConfig(fsdp=2, tensor=2), value_head=True)
    assert set(rules) == set(shapes) | {"value_head.weight", "value_head.bias"}
    for name, shape in shapes.items():
        assert len(rules[name]) == len(shape)
        for dim, axis in zip(shape, rules[name]):
            assert axis is None or dim % 2 == 0


def test_decoder_rules_follow_megatron_layout():
    """Hand-written expectations: column-parallel in-projections, row-parallel out-projections, model dim on fsdp."""
    mesh = MeshConfig(fsdp=2, tensor=2)
    rules = M.spec_rules(tiny_spec("qwen3"), mesh)
    p = "model.layers.1."
    assert rules[p + "self_attn.q_proj.weight"] == ("tensor", "fsdp")
    assert rules[p + "self_attn.k_proj.weight"] == ("tensor", "fsdp")
    assert rules[p + "self_attn.o_proj.weight"] == ("fsdp", "tensor")
    assert rules[p + "mlp.up_proj.weight"] == ("tensor", "fsdp")
    assert rules[p + "mlp.down_proj.weight"] == ("fsdp", "tensor")
    assert rules[p + "self_attn.q_norm.weight"] == (None,)
    assert rules[p + "input_layernorm.weight"] == ("fsdp",)
    assert rules["model.embed_tokens.weight"] == ("tensor", "fsdp")
    assert M.spec_rules(tiny_spec("qwen2"), mesh)[p + "self_attn.q_proj.bias"] == ("tensor",)


def test_recurrent_rules_never_split_the_fused_projections_over_heads():
    rules = M.spec_rules(tiny_recurrent_spec(), MeshConfig(fsdp=2, tensor=2))
    p = "transformer.core_block.0."
    assert rules[p + "attn.Wqkv.weight"] == (None, "fsdp")
    assert rules[p + "mlp.fc.weight"] == (None, "fsdp")
    assert rules[p + "attn.proj.weight"] == ("fsdp", "tensor")
    assert rules["transformer.adapter.weight"] == ("fsdp", None)


def test_axes_of_size_one_and_non_dividing_axes_are_dropped():
    assert M.mesh_axes("model.layers.0.mlp.up_proj.weight", (128, 64), MeshConfig()) == (None, None)
    assert M.mesh_axes("model.layers.0.mlp.up_proj.weight", (128, 60), MeshConfig(fsdp=8)) == (None, None)


def test_a_parameter_without_a_rule_names_itself():
    with pytest.raises(MeshError, match=r"model\.layers\.0\.mystery\.weight"):
        M.logical_axes("model.layers.0.mystery.weight")


@pytest.mark.parametrize("spec", SPECS[:1] + SPECS[4:5], ids=["llama", "huginn"])
def test_rules_store_total_over_n_bytes_per_device_at_fsdp_8(spec):
    """Independent of any backend: per-device elements implied by the rules, summed over parameters."""
    mesh = MeshConfig(fsdp=8)
    shapes = spec.param_shapes()
    total = sum(int(np.prod(s)) for s in shapes.values())
    per_device = sum(int(np.prod(s)) // (8 if "fsdp" in M.mesh_axes(n, s, mesh, recurrent=n.startswith("transformer"))
                                         else 1) for n, s in shapes.items())
    assert total / 8 <= per_device <= 1.05 * total / 8


def test_check_devices_names_both_sizes_and_the_fix():
    with pytest.raises(MeshError, match=r"4 devices but the run has 8 devices.*fsdp=8"):
        M.check_devices(MeshConfig(fsdp=4), 8)


@pytest.mark.parametrize(("spec", "tensor", "what"), [(tiny_spec("llama"), 3, "num_attention_heads"),
                                                      (tiny_spec("llama"), 4, "num_key_value_heads"),
                                                      (tiny_recurrent_spec(), 8, "num_attention_heads")])
def test_heads_not_divisible_by_tensor_are_refused(spec, tensor, what):
    with pytest.raises(MeshError, match=f"{what} .* not divisible by mesh tensor={tensor}"):
        M.check_model(MeshConfig(tensor=tensor), spec)


def test_batch_not_divisible_by_data_times_fsdp_is_refused():
    M.check_batch(MeshConfig(data=2, fsdp=2, tensor=2), 8)
    with pytest.raises(MeshError, match=r"6 rows, not divisible by data x fsdp = 4"):
        M.check_batch(MeshConfig(data=2, fsdp=2), 6)


def test_torch_has_no_tensor_plan_for_recurrent_models():
    M.check_backend(MeshConfig(tensor=2), "jax", tiny_recurrent_spec())
    M.check_backend(MeshConfig(tensor=2), "torch", tiny_spec())
    with pytest.raises(MeshError, match="tensor-parallel plan for recurrent"):
        M.check_backend(MeshConfig(tensor=2), "torch", tiny_recurrent_spec())
    with pytest.raises(MeshError, match="Unknown backend"):
        M.check_backend(MeshConfig(), "mxnet")


@pytest.mark.parametrize("cfg", [MeshConfig(fsdp=4), MeshConfig(data=2, fsdp=2), MeshConfig(fsdp=2, tensor=2),
                                 MeshConfig(data=2, fsdp=2, tensor=2)])
def test_ranks_cover_the_batch_once_and_tensor_peers_share_rows(cfg):
    grid = np.arange(cfg.size).reshape(cfg.shape)  # the oracle: numpy's row-major layout of the mesh
    rows = np.arange(16)
    seen = []
    for r in range(cfg.size):
        d, f, t = (int(i[0]) for i in np.nonzero(grid == r))
        assert M.coords(r, cfg) == {"data": d, "fsdp": f, "tensor": t}
        part = rows[M.batch_slice(16, cfg, M.batch_shard_of(r, cfg))]
        if t == 0:
            seen.append(part)
        else:
            peer = int(grid[d, f, 0])
            assert np.array_equal(part, rows[M.batch_slice(16, cfg, M.batch_shard_of(peer, cfg))])
    assert np.array_equal(np.sort(np.concatenate(seen)), rows)


def test_no_mesh_means_every_device_on_fsdp_and_an_explicit_one_must_match():
    assert M.resolve(None, 8) == MeshConfig(fsdp=8)
    assert M.resolve(None, 1).is_single
    assert M.resolve({"data": 2, "fsdp": 4}, 8) == MeshConfig(data=2, fsdp=4)
    with pytest.raises(MeshError, match="4 devices but the run has 8"):
        M.resolve("fsdp=4", 8)


def test_remat_modes():
    assert [M.check_remat(m) for m in M.REMAT] == ["none", "layer"]
    with pytest.raises(MeshError, match="remat must be one of none, layer"):
        M.check_remat("full")


def test_only_rank_zero_is_the_main_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    assert M.is_main_process()
    monkeypatch.setenv("RANK", "3")
    assert not M.is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert M.is_main_process()
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert not M.is_main_process()
