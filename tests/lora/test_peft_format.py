"""PEFT is the oracle of the canonical adapter form: a folder diptych saves loads into ``peft.PeftModel`` on the
transformers model with the same logits, merging equals PEFT's ``merge_and_unload``, and a folder PEFT saved
loads into diptych."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diptych.core.backend import get_backend
from diptych.core.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRAConfig,
    LoRAError,
    load_adapter,
    merge_weights,
    save_adapter,
)
from tests.lora.conftest import BACKEND_NAMES, HF_CASES, batch, build, build_hf, lora_module, random_adapters, to_np

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _diptych(name: str, folder, cfg: LoRAConfig, seed: int = 1):
    """A diptych model from the HF folder, with random nonzero adapters; returns (model, adapters)."""
    from diptych.core.hf import load_hf_folder

    spec, weights = load_hf_folder(folder)
    lora = lora_module(name)
    model = lora.apply_lora(build(name, spec, weights), cfg, seed=0)
    adapters = random_adapters(lora.export_adapters(model), seed=seed)
    lora.load_adapters(model, adapters)
    return model, adapters


def _peft_logits(folder, adapter_folder, tokens: np.ndarray) -> tuple[np.ndarray, object]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(hf, adapter_folder).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
    return logits, model


@pytest.mark.parametrize("model_type", list(HF_CASES))
@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_saved_adapter_loads_into_peft_with_the_same_logits_and_merge(name, model_type, hf_folders, tmp_path):
    folder = hf_folders[model_type]
    cfg = LoRAConfig(r=4, alpha=12.0)
    model, adapters = _diptych(name, folder, cfg)
    save_adapter(tmp_path / "adapter", adapters, cfg, base_model_name_or_path=str(folder))
    tokens = np.random.default_rng(0).integers(3, 96, size=(2, 7))
    ours = to_np(get_backend(name).forward(model, tokens))
    theirs, peft_model = _peft_logits(folder, tmp_path / "adapter", tokens)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    adapted = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert {n.removeprefix("base_model.model.") for n in adapted} == {k[: -len(".lora_A.weight")] for k in adapters
                                                                      if k.endswith(".lora_A.weight")}
    merged_peft = {k: v.float().numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
    merged = lora_module(name).merged_weights(model)
    if "lm_head.weight" not in merged:  # tied
        merged_peft.pop("lm_head.weight")
    assert merged.keys() == merged_peft.keys()
    for k in merged:
        np.testing.assert_allclose(merged[k], merged_peft[k], atol=1e-6, rtol=0, err_msg=k)


def test_peft_saved_folder_round_trips_with_rslora(hf_folders, tmp_path):
    folder = hf_folders["llama"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "down_proj"], use_rslora=True,
                             task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "peft")
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    adapters, cfg = load_adapter(tmp_path / "peft")
    assert (cfg.r, cfg.alpha, cfg.use_rslora, set(cfg.targets)) == (4, 6.0, True, {"q_proj", "down_proj"})
    assert cfg.scaling == pytest.approx(layer.scaling["default"])  # alpha / sqrt(r)
    expected = {k.removeprefix("base_model.model.").replace(".default", ""): v.detach().numpy()
                for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert adapters.keys() == expected.keys()
    for k in adapters:
        np.testing.assert_array_equal(adapters[k], expected[k])
    # saving it again writes what PEFT wrote
    save_adapter(tmp_path / "again", adapters, cfg)
    again, cfg2 = load_adapter(tmp_path / "again")
    assert cfg2 == cfg and all(np.array_equal(again[k], adapters[k]) for k in adapters)
    # and the adapted model computes what PEFT's does
    tokens = np.random.default_rng(0).integers(3, 96, size=(2, 7))
    with torch.no_grad():
        theirs = peft_model.eval()(input_ids=torch.as_tensor(tokens)).logits.numpy()
    from diptych.core.hf import load_hf_folder

    spec, weights = load_hf_folder(folder)
    for name in ("torch", "jax"):
        pytest.importorskip(name)
        model = lora_module(name).apply_lora(build(name, spec, weights), cfg, adapters=adapters)
        np.testing.assert_allclose(to_np(get_backend(name).forward(model, tokens)), theirs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(merge_weights(weights, adapters, cfg)["model.layers.1.mlp.down_proj.weight"],
                               peft_model.merge_and_unload().state_dict()["model.layers.1.mlp.down_proj.weight"]
                               .numpy(), atol=1e-6)


def test_regex_targets_are_written_as_the_exact_modules(hf_folders, tmp_path):
    folder = hf_folders["llama"]
    cfg = LoRAConfig(r=2, alpha=4.0, targets=(r"model\.layers\.1\.self_attn\.(q|v)_proj",))
    model, adapters = _diptych("torch", folder, cfg)
    save_adapter(tmp_path, adapters, cfg)
    written = json.loads((tmp_path / ADAPTER_CONFIG).read_text())["target_modules"]
    assert written == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    tokens = np.random.default_rng(0).integers(3, 96, size=(1, 5))
    theirs, _ = _peft_logits(folder, tmp_path, tokens)
    np.testing.assert_allclose(to_np(get_backend("torch").forward(model, tokens)), theirs, atol=1e-5, rtol=0)


def test_save_adapter_keeps_other_files_and_load_refuses_what_it_cannot_run(tmp_path):
    adapters = {"m.q_proj.lora_A.weight": np.ones((2, 4), np.float32),
                "m.q_proj.lora_B.weight": np.zeros((3, 2), np.float32)}
    (tmp_path / "config.json").write_text("{}")
    save_adapter(tmp_path, adapters, LoRAConfig(r=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, "config.json"])
    with pytest.raises(LoRAError, match=r"no adapter_config\.json"):
        load_adapter(tmp_path / "missing")
    conf = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**conf, "use_dora": True}))
    with pytest.raises(LoRAError, match=r"use_dora=True.*does not support"):
        load_adapter(tmp_path)
    with pytest.raises(LoRAError, match="missing"):
        save_adapter(tmp_path / "bad", {"m.q_proj.lora_A.weight": adapters["m.q_proj.lora_A.weight"]},
                     LoRAConfig(r=2))


def test_dropout_and_tied_llama_peft_oracle(tmp_path):
    """A tied-embedding model's head is never adapted; PEFT agrees on which modules are."""
    hf = build_hf("llama")
    hf.config.tie_word_embeddings = True
    tied = transformers.AutoModelForCausalLM.from_config(hf.config, attn_implementation="eager")
    tied.load_state_dict({k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}, strict=False)
    tied.tie_weights()
    tied.save_pretrained(tmp_path / "base")
    from diptych.core.hf import load_hf_folder

    assert "lm_head.weight" not in load_hf_folder(tmp_path / "base")[1]
    cfg = LoRAConfig(r=2, alpha=2.0, dropout=0.1)
    model, adapters = _diptych("torch", tmp_path / "base", cfg)
    assert not any(k.startswith("lm_head") for k in adapters)
    model.eval()
    save_adapter(tmp_path / "adapter", adapters, cfg)
    tokens = batch()[0]
    tokens = tokens[:, -5:]
    theirs, _ = _peft_logits(tmp_path / "base", tmp_path / "adapter", tokens)
    np.testing.assert_allclose(to_np(get_backend("torch").forward(model, tokens)), theirs, atol=1e-5, rtol=0)


def test_load_adapter_reads_bf16_adapters_as_peft_saves_them_for_a_bf16_model(tmp_path):
    from safetensors.torch import save_file

    a = torch.tensor([[0.5, -1.25, 3.0, 0.0]], dtype=torch.bfloat16)
    zeros = {"m.q_proj.lora_A.weight": np.zeros((1, 4), np.float32), "m.q_proj.lora_B.weight": np.zeros((3, 1),
                                                                                                     np.float32)}
    save_adapter(tmp_path, zeros, LoRAConfig(r=1, targets=("q_proj",)))
    save_file({"base_model.model.m.q_proj.lora_A.weight": a,
               "base_model.model.m.q_proj.lora_B.weight": torch.ones(3, 1, dtype=torch.bfloat16)},
              str(tmp_path / ADAPTER_WEIGHTS))
    adapters, cfg = load_adapter(tmp_path)
    assert adapters["m.q_proj.lora_A.weight"].dtype == np.float32
    np.testing.assert_array_equal(adapters["m.q_proj.lora_A.weight"], a.float().numpy())
    assert cfg.r == 1 and cfg.targets == ("q_proj",)
