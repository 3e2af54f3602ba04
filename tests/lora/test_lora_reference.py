"""The reference policy with LoRA is the policy with its adapters off: no second model is built or stored, it scores
exactly as the starting model however far the adapters have trained, and GRPO, DPO (its precomputed cache) and PPO
all use it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HAS_JAX, HAS_TORCH

from diptych.core.backend import AdaptersOff, get_backend
from diptych.core.lora import LoRAConfig
from diptych.core.optim import OptimConfig
from diptych.core.spec import tiny_spec
from diptych.core.tokenizer import CharTokenizer
from diptych.core.trainers.base import sequence_logprobs

BACKENDS = [pytest.param("jax", marks=pytest.mark.skipif(not HAS_JAX, reason="jax extra not installed")),
            pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="torch not installed"))]
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
LORA = LoRAConfig(r=4, alpha=8.0)
ROWS = [{"prompt": f"{c}>"} for c in "bcdefghijk"]


def variety(prompts, completions, **columns):
    return [len(set(c)) / (1 + len(c)) for c in completions]


def _spec():
    tok = CharTokenizer()
    return tok, tiny_spec("llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, initializer_range=0.3)


def _probe(vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    tokens = rng.integers(3, vocab, size=(3, 9)).astype(np.int32)
    attn = np.ones_like(tokens)
    attn[0, :3] = 0
    return {"tokens": tokens, "attention_mask": attn, "mask": attn[:, 1:].astype(np.float32)}


def _count_builds(monkeypatch, be) -> list[int]:
    calls = [0]
    original = be.build

    def counting(*args, **kw):
        calls[0] += 1
        return original(*args, **kw)

    monkeypatch.setattr(be, "build", counting)
    return calls


@pytest.mark.parametrize("name", BACKENDS)
def test_grpo_reference_with_lora_is_the_policy_with_adapters_off(name, monkeypatch, tmp_path):
    from diptych.core.trainers.api import GRPOTrainer
    from diptych.core.trainers.grpo import GRPOConfig

    be = get_backend(name)
    tok, spec = _spec()
    w = spec.init_weights(0)
    cfg = GRPOConfig(steps=2, prompts_per_step=2, num_generations=4, max_prompt_length=3, max_completion_length=4,
                     seed=1, beta=0.04, lora=LORA, optim=OptimConfig(lr=5e-2))
    trainer = GRPOTrainer(be.build(spec, w), variety, args=cfg, backend=be, tokenizer=tok, train_dataset=ROWS,
                          out_dir=tmp_path / "run")
    builds = _count_builds(monkeypatch, be)
    trainer.train()
    assert builds[0] == 0  # no reference model was built (full fine-tuning builds one: see the control below)
    assert not (tmp_path / "run" / "checkpoints" / "reference").exists()  # nor written
    ref = trainer.ref_model
    assert isinstance(ref, AdaptersOff)
    if name == "torch":
        assert ref.model is trainer.state.model  # the same module, hence the same weights in memory
    probe = _probe(spec.vocab_size)
    args = (probe["tokens"], probe["attention_mask"], probe["mask"])
    start = sequence_logprobs(be, be.build(spec, w), *args)
    assert np.array_equal(sequence_logprobs(be, ref, *args), start)  # the reference is the starting model, exactly
    assert np.array_equal(sequence_logprobs(be, AdaptersOff(trainer.state.model), *args), start)
    assert np.abs(sequence_logprobs(be, trainer.state.model, *args) - start).max() > 1e-4  # the policy trained
    assert trainer.history[-1]["kl"] > 0


@needs_torch
def test_control_full_fine_tuning_builds_a_reference_copy(monkeypatch):
    """The build counter above can see a reference: full fine-tuning with beta > 0 builds one."""
    from diptych.core.trainers.api import GRPOTrainer
    from diptych.core.trainers.grpo import GRPOConfig

    be = get_backend("torch")
    tok, spec = _spec()
    cfg = GRPOConfig(steps=1, prompts_per_step=2, num_generations=4, max_prompt_length=3, max_completion_length=4,
                     seed=1, beta=0.04)
    trainer = GRPOTrainer(be.build(spec, spec.init_weights(0)), variety, args=cfg, backend=be, tokenizer=tok,
                          train_dataset=ROWS)
    builds = _count_builds(monkeypatch, be)
    trainer.train()
    assert builds[0] == 1 and not isinstance(trainer.ref_model, AdaptersOff)


@needs_torch
def test_lora_state_memory_is_the_same_with_and_without_a_kl_term():
    """What the run holds (policy, optimizer, reference) has the same bytes at beta > 0 and beta = 0 under LoRA."""
    import torch

    from diptych.core.trainers.api import GRPOTrainer
    from diptych.core.trainers.grpo import GRPOConfig

    def held_bytes(beta: float, lora: LoRAConfig | None = LORA) -> int:
        be = get_backend("torch")
        tok, spec = _spec()
        cfg = GRPOConfig(steps=1, prompts_per_step=2, num_generations=4, max_prompt_length=3, max_completion_length=4,
                         seed=1, beta=beta, lora=lora, optim=OptimConfig(lr=5e-2))
        trainer = GRPOTrainer(be.build(spec, spec.init_weights(0)), variety, args=cfg, backend=be, tokenizer=tok,
                              train_dataset=ROWS)
        trainer.train()
        tensors: dict[int, int] = {}
        ref = trainer.ref_model.model if isinstance(trainer.ref_model, AdaptersOff) else trainer.ref_model
        modules = [trainer.state.model] + ([ref] if ref is not None else [])
        for module in modules:
            for t in (*module.parameters(), *module.buffers()):
                tensors[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        for st in trainer.state.optimizer.state.values():
            for t in st.values():
                if isinstance(t, torch.Tensor):
                    tensors[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(tensors.values())

    with_kl, without = held_bytes(0.04), held_bytes(0.0)
    assert with_kl == without
    assert held_bytes(0.04, None) > held_bytes(0.0, None)  # full fine-tuning's reference shows: the measure can tell


@pytest.mark.parametrize("name", BACKENDS)
def test_dpo_reference_cache_with_lora_is_the_base_model(name, monkeypatch, tmp_path):
    """DPOTrainer's cache and train_dpo's own cache both score with the adapters off, even when the adapters already
    act (loaded, nonzero B): the cache equals the plain base model's, exactly."""
    from diptych.core.trainers import dpo as dpo_mod
    from diptych.core.trainers.api import DPOTrainer
    from diptych.core.trainers.dpo import DPOConfig, ReferenceCache, train_dpo

    be = get_backend(name)
    tok, spec = _spec()
    w = spec.init_weights(0)
    rows = [{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(6)]
    cfg = DPOConfig(steps=1, batch_size=2, max_prompt_length=5, max_completion_length=3, lora=LORA,
                    precompute_ref_batch_size=3, optim=OptimConfig(lr=1e-2, warmup_steps=0))
    plain = ReferenceCache.compute(be, be.build(spec, w), tok, rows, cfg)
    rng = np.random.default_rng(0)

    def acting_lora_model():
        model = be.apply_lora(be.build(spec, w), LORA, seed=0)
        adapters = {k: (0.3 * rng.standard_normal(v.shape)).astype(np.float32)
                    for k, v in be.export_adapters(model).items()}
        return importlib_lora(name).load_adapters(model, adapters)

    seen = []
    original = ReferenceCache.compute.__func__

    def spy(cls, backend, ref_model, *a, **kw):
        out = original(cls, backend, ref_model, *a, **kw)
        seen.append((ref_model, out))
        return out

    monkeypatch.setattr(dpo_mod.ReferenceCache, "compute", classmethod(spy))
    state = be.init_train_state(acting_lora_model(), cfg.optim)
    train_dpo(be, state, tok, rows, cfg)
    trainer = DPOTrainer(be.build(spec, w), args=cfg, backend=be, tokenizer=tok, train_dataset=rows,
                         out_dir=tmp_path / "run")
    trainer.init_state = lambda model: be.init_train_state(acting_lora_model(), cfg.optim)  # adapters that act
    trainer.train()
    assert len(seen) == 2
    for ref, cache in seen:
        assert isinstance(ref, AdaptersOff)
        assert np.array_equal(cache.chosen, plain.chosen) and np.array_equal(cache.rejected, plain.rejected)
    acting = ReferenceCache.compute(be, acting_lora_model(), tok, rows, cfg)
    assert np.abs(acting.chosen - plain.chosen).max() > 1e-3  # with the adapters on it would differ


def importlib_lora(name: str):
    import importlib

    return importlib.import_module(f"diptych.backends.{name}.lora")


@needs_torch
def test_ppo_with_lora_trains_adapters_and_value_head_against_the_adapters_off_reference():
    from diptych.core.trainers.api import PPOTrainer
    from diptych.core.trainers.ppo import PPOConfig

    be = get_backend("torch")
    tok, spec = _spec()
    w = spec.init_weights(0)
    cfg = PPOConfig(steps=2, prompts_per_step=2, num_generations=2, num_ppo_epochs=1, max_prompt_length=3,
                    max_completion_length=4, kl_coef=0.05, seed=1, lora=LORA, optim=OptimConfig(lr=2e-2))
    trainer = PPOTrainer(be.build(spec, w), variety, args=cfg, backend=be, tokenizer=tok, train_dataset=ROWS)
    trainer.train()
    state = trainer.state
    n_adapter = sum(v.size for v in be.export_adapters(state.model).values())
    assert sum(p.numel() for p in state.master) == n_adapter + spec.hidden_size + 1  # adapters + value head
    assert isinstance(trainer.ref_model, AdaptersOff) and trainer.ref_model.model is state.model
    assert all(np.array_equal(be.export(state.model)[k], w[k]) for k in w)
    assert all(np.isfinite(h["kl"]) for h in trainer.history)
