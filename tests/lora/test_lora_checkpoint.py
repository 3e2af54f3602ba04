"""LoRA checkpoints and exports: a checkpoint holds the frozen base once, the adapters (a PEFT folder) and only the
adapters' optimizer moments; a killed-and-resumed LoRA GRPO run with a KL term equals the uninterrupted run bit for
bit; full fine-tuning and LoRA checkpoints refuse to resume into each other; the run's ``final/`` folder is the
merged model (transformers loads it, logits within 1e-5 of the diptych LoRA model) plus ``final/adapter`` (PEFT
loads it onto the transformers base); ``diptych convert`` moves LoRA checkpoints and merges adapter folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import HAS_JAX, HAS_TORCH

from diptych.core.backend import get_backend
from diptych.core.lora import LoRAConfig, load_adapter
from diptych.core.optim import OptimConfig
from diptych.core.spec import tiny_spec
from diptych.core.tokenizer import CharTokenizer

BACKENDS = [pytest.param("jax", marks=pytest.mark.skipif(not HAS_JAX, reason="jax extra not installed")),
            pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="torch not installed"))]
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
LORA = LoRAConfig(r=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
STEPS = 4
ROWS = [{"prompt": f"{c}>"} for c in "bcdefghijk"]


def variety(prompts, completions, **columns):
    """A dense reward, so a random model gets non-zero advantages."""
    return [len(set(c)) / (1 + len(c)) for c in completions]


def spec_for(tok):
    return tiny_spec("llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     initializer_range=0.3)


def grpo_trainer(be, out, steps, *, resume=False, lora=LORA, beta=0.04):
    from diptych.core.trainers.api import GRPOTrainer
    from diptych.core.trainers.grpo import GRPOConfig
    from diptych.core.trainers.runner import CheckpointConfig

    tok = CharTokenizer()
    spec = spec_for(tok)
    cfg = GRPOConfig(steps=steps, prompts_per_step=2, num_generations=4, micro_batches=2, max_prompt_length=3,
                     max_completion_length=4, seed=3, beta=beta, lora=lora,
                     optim=OptimConfig(lr=3e-2, warmup_steps=1, total_steps=STEPS, schedule="cosine"))
    model = None if resume else be.build(spec, spec.init_weights(0))
    return GRPOTrainer(model, variety, args=cfg, backend=be, tokenizer=tok, train_dataset=ROWS, out_dir=out,
                       checkpoint=CheckpointConfig(every=2, keep_last=2), resume_from_checkpoint=resume)


class Killed(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKENDS)
def test_killed_and_resumed_lora_grpo_run_equals_the_uninterrupted_run(name, tmp_path, monkeypatch):
    from diptych.core.trainers.base import DivergenceGuard

    be = get_backend(name)
    full = grpo_trainer(be, tmp_path / "full", STEPS)
    full.train()
    first = grpo_trainer(be, tmp_path / "cut", STEPS)
    check = DivergenceGuard.check

    def dies_after_step_3(self, step, metrics, state=None):  # after step 3's update, before the step-4 checkpoint
        check(self, step, metrics, state)
        if step == 3:
            raise Killed(step)

    monkeypatch.setattr(DivergenceGuard, "check", dies_after_step_3)
    with pytest.raises(Killed):
        first.train()
    monkeypatch.setattr(DivergenceGuard, "check", check)
    ckpt = tmp_path / "cut" / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in ckpt.parent.iterdir() if p.name.startswith("step_")) == [ckpt.name]
    meta = json.loads((ckpt / "diptych.json").read_text())
    assert meta["lora"]["r"] == 4 and meta["lora"]["targets"] == ["q_proj", "v_proj", "down_proj"]
    assert not (tmp_path / "cut" / "checkpoints" / "reference").exists()  # the reference is the base, not a copy
    spec = spec_for(CharTokenizer())
    w0 = spec.init_weights(0)
    _check_checkpoint_layout(name, ckpt, w0, be.export_adapters(be.restore(ckpt)[0].model))

    resumed = grpo_trainer(be, tmp_path / "cut", STEPS, resume=True)
    resumed.train()
    by_step = lambda h: {int(r["step"]): r for r in h}
    a, b = by_step(full.history), by_step(resumed.history)
    for step in (3, 4):
        for key in ("loss", "reward", "kl", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
    fa, fb = be.export_adapters(full.state.model), be.export_adapters(resumed.state.model)
    assert set(fa) == set(fb) and all(np.array_equal(fa[k], fb[k]) for k in fa)
    assert a[4]["kl"] > 0 and all(np.array_equal(be.export(resumed.state.model)[k], w0[k]) for k in w0)


def _check_checkpoint_layout(name, ckpt, w0, adapters):
    """The base once (equal to the starting weights), the adapters as a PEFT folder, no base optimizer moments."""
    from diptych.core.hf import load_hf_folder, read_safetensors

    base_dir = ckpt if name == "torch" else ckpt / "base"
    base = read_safetensors(base_dir)
    assert set(base) == set(w0) and all(np.array_equal(base[k], w0[k]) for k in w0)
    load_hf_folder(base_dir)  # an HF folder of the base
    saved, cfg = load_adapter(ckpt / "adapter")
    assert cfg.r == 4 and set(saved) == set(adapters) and all(np.array_equal(saved[k], adapters[k]) for k in saved)
    n_adapter = sum(v.size for v in adapters.values())
    if name == "torch":
        import torch

        opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
        floats = sum(int(t.numel()) for st in opt["state"].values() for k, t in st.items()
                     if k in ("exp_avg", "exp_avg_sq"))
    else:
        from diptych.backends.jax.checkpoint import restore
        from diptych.backends.jax.train import export_optimizer

        moments = export_optimizer(restore(ckpt)[0])
        floats = sum(v.size for part in ("mu", "nu") for v in moments[part].values())
    assert floats == 2 * n_adapter


@needs_torch
def test_full_and_lora_checkpoints_refuse_to_resume_into_each_other(tmp_path):
    from diptych.core.trainers.base import TrainerError

    be = get_backend("torch")
    grpo_trainer(be, tmp_path / "full", 1, lora=None, beta=0.0).train()
    with pytest.raises(TrainerError, match="full fine-tuning checkpoint and this run sets lora"):
        grpo_trainer(be, tmp_path / "full", 2, resume=True, beta=0.0).train()
    grpo_trainer(be, tmp_path / "lora", 1, beta=0.0).train()
    with pytest.raises(TrainerError, match=r"is a LoRA checkpoint .* and this run has no lora block"):
        grpo_trainer(be, tmp_path / "lora", 2, resume=True, lora=None, beta=0.0).train()
    with pytest.raises(TrainerError, match=r"was trained with lora .* this run sets lora"):
        grpo_trainer(be, tmp_path / "lora", 2, resume=True, lora=LoRAConfig(r=2, alpha=8.0), beta=0.0).train()


@pytest.mark.parametrize("name", BACKENDS)
def test_final_folder_is_the_merged_model_and_its_peft_adapter(name, tmp_path):
    """SFT with LoRA: ``final/`` loads in transformers with logits within 1e-5 of the diptych LoRA model, and
    ``final/adapter`` loaded by PEFT onto the transformers base gives the same logits."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import torch

    from diptych.core.trainers.api import SFTTrainer
    from diptych.core.trainers.sft import SFTConfig

    be = get_backend(name)
    tok = CharTokenizer()
    spec = spec_for(tok)
    rows = [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(8)]
    cfg = SFTConfig(steps=3, batch_size=4, max_prompt_length=5, max_completion_length=3, lora=LORA,
                    optim=OptimConfig(lr=3e-2, warmup_steps=0))
    trainer = SFTTrainer(be.build(spec, spec.init_weights(0)), args=cfg, backend=be, tokenizer=tok,
                         train_dataset=rows, out_dir=tmp_path / "run")
    result = trainer.train()
    final = tmp_path / "run" / "final"
    assert result["final"] == str(final) and (final / "adapter" / "adapter_model.safetensors").is_file()
    tokens = np.array([[5, 9, 14, 3, 22, 7, 30, 11]], np.int32)
    ours = np.asarray(be.to_numpy(be.forward(trainer.state.model, tokens, np.ones_like(tokens))))
    merged = transformers.AutoModelForCausalLM.from_pretrained(final, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = merged(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(theirs - ours).max() <= 1e-5
    base_dir = tmp_path / "base"
    from diptych.core.hf import save_hf_folder

    save_hf_folder(base_dir, spec, spec.init_weights(0))
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        adapted = peft.PeftModel.from_pretrained(base, final / "adapter").eval()
        via_peft = adapted(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(via_peft - ours).max() <= 1e-5
    assert np.abs(ours - np.asarray(be.to_numpy(be.forward(be.build(spec, spec.init_weights(0)), tokens,
                                                           np.ones_like(tokens))))).max() > 1e-3  # it trained


@needs_torch
def test_convert_merges_an_adapter_folder_and_refuses_a_foreign_base(tmp_path, capsys):
    from diptych.cli import main
    from diptych.core.hf import load_hf_folder, save_hf_folder
    from diptych.core.lora import merge_weights, save_adapter

    be = get_backend("torch")
    spec = spec_for(CharTokenizer())
    w = spec.init_weights(0)
    model = be.apply_lora(be.build(spec, w), LORA, seed=0)
    rng = np.random.default_rng(0)
    adapters = {k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32)
                for k, v in be.export_adapters(model).items()}
    save_adapter(tmp_path / "adapter", adapters, LORA)
    save_hf_folder(tmp_path / "base", spec, w)
    assert main(["convert", str(tmp_path / "adapter"), str(tmp_path / "merged"), "--base", str(tmp_path / "base"),
                 "--to", "hf"]) == 0
    _, merged = load_hf_folder(tmp_path / "merged")
    want = merge_weights(w, adapters, LORA)
    q = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_allclose(merged[q], w[q] + 2.0 * adapters[q.replace("weight", "lora_B.weight")]
                               @ adapters[q.replace("weight", "lora_A.weight")], rtol=0, atol=1e-6)
    assert all(np.array_equal(merged[k], want[k]) for k in want)
    capsys.readouterr()
    other = tiny_spec("llama", vocab_size=spec.vocab_size, hidden_size=48, intermediate_size=64, num_hidden_layers=1)
    save_hf_folder(tmp_path / "other", other, other.init_weights(0))
    assert main(["convert", str(tmp_path / "adapter"), str(tmp_path / "bad"), "--base", str(tmp_path / "other"),
                 "--to", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit the base" in err and "down_proj is [48, 64]" in err, err
    assert main(["convert", str(tmp_path / "adapter"), str(tmp_path / "bad"), "--to", "hf"]) == 2
    assert "--base" in capsys.readouterr().err


@pytest.mark.skipif(not (HAS_JAX and HAS_TORCH), reason="needs both backends")
def test_a_lora_checkpoint_converts_between_backends_and_to_hf(tmp_path):
    from diptych.commands.convert import convert
    from diptych.core.hf import load_hf_folder
    from diptych.core.losses import SFTLossConfig
    from diptych.parity.train_suite import sft_rows

    torch_be, jax_be = get_backend("torch"), get_backend("jax")
    spec = tiny_spec("llama", vocab_size=64, hidden_size=32, intermediate_size=64)
    state = torch_be.init_train_state(torch_be.apply_lora(torch_be.build(spec, spec.init_weights(0)), LORA),
                                      OptimConfig(lr=1e-2, warmup_steps=0))
    state, _ = torch_be.train_step(state, [sft_rows(64)], "sft", SFTLossConfig())
    torch_be.save(state, tmp_path / "t")
    convert(tmp_path / "t", tmp_path / "j", "jax")
    restored, _ = jax_be.restore(tmp_path / "j")
    assert jax_be.lora_config(restored.model).r == 4 and restored.step == 1
    want = torch_be.export_adapters(state.model)
    got = jax_be.export_adapters(restored.model)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    from diptych.backends.jax.train import export_optimizer as jax_moments
    from diptych.backends.torch.train import export_optimizer as torch_moments

    mt, mj = torch_moments(state), jax_moments(restored)
    assert mj["count"] == mt["count"] == 1 and all(np.array_equal(mj["mu"][k], mt["mu"][k]) for k in mt["mu"])
    convert(tmp_path / "j", tmp_path / "hf", "hf")
    _, merged = load_hf_folder(tmp_path / "hf")
    expected = torch_be.export_weights(state)
    assert all(np.abs(merged[k] - expected[k]).max() <= 1e-6 for k in expected)
    assert set(load_adapter(tmp_path / "hf" / "adapter")[0]) == set(want)


@pytest.mark.parametrize("name", BACKENDS)
def test_qlora_checkpoint_keeps_the_packed_nf4_base_and_resumes_exactly(name, tmp_path):
    """A double-quantised NF4 base does not survive dequantise -> quantise; the checkpoint stores it packed, so the
    restored state computes the same logits and its next step the same loss as the live one."""
    from diptych.core.losses import SFTLossConfig
    from diptych.parity.train_suite import sft_rows

    be = get_backend(name)
    spec = tiny_spec("llama", vocab_size=64, hidden_size=64, intermediate_size=128)
    cfg = LoRAConfig(r=4, alpha=8.0, quantize_base="nf4", double_quant=True)
    state = be.init_train_state(be.apply_lora(be.build(spec, spec.init_weights(0)), cfg),
                                OptimConfig(lr=1e-2, warmup_steps=0))
    batch = sft_rows(64)
    state, _ = be.train_step(state, [batch], "sft", SFTLossConfig())
    be.save(state, tmp_path / "c")
    assert (tmp_path / "c" / "base_nf4.safetensors").is_file()
    restored, _ = be.restore(tmp_path / "c")
    tokens = batch["tokens"]
    assert np.array_equal(be.to_numpy(be.forward(state.model, tokens)), be.to_numpy(be.forward(restored.model, tokens)))
    _, live = be.train_step(state, [batch], "sft", SFTLossConfig())
    _, again = be.train_step(restored, [batch], "sft", SFTLossConfig())
    assert live["loss"] == again["loss"]
