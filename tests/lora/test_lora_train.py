"""LoRA training on both backends: the optimizer holds the adapters only, JAX equals torch step for step (the
``lora`` parity suite), the base never moves, a short GRPO run with adapters raises a dense reward, recurrent-depth
models train with adapters, and a target that matches nothing fails before step 1 in one line through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HAS_JAX, HAS_TORCH

from diptych.core.backend import get_backend
from diptych.core.lora import LoRAConfig
from diptych.core.losses import SFTLossConfig
from diptych.core.optim import OptimConfig
from diptych.core.spec import tiny_spec

BACKENDS = [pytest.param("jax", marks=pytest.mark.skipif(not HAS_JAX, reason="jax extra not installed")),
            pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="torch not installed"))]
both = pytest.mark.skipif(not (HAS_JAX and HAS_TORCH), reason="needs both backends")
SUITE_SPEC = dict(vocab_size=64, hidden_size=32, intermediate_size=64)
"""The train suite's shape (tests/trainers/test_train_suite.py), so JAX reuses its compiled programs."""
LORA = LoRAConfig(r=4, alpha=8.0)


def _sft_batch(vocab: int) -> dict[str, np.ndarray]:
    from diptych.parity.train_suite import sft_rows

    return sft_rows(vocab)


def _lora_state(name: str, spec, weights, optim: OptimConfig, lora: LoRAConfig = LORA):
    be = get_backend(name)
    model = be.apply_lora(be.build(spec, weights), lora, seed=0)
    return be, be.init_train_state(model, optim)


def _optimizer_floats(name: str, state) -> int:
    """How many float32 numbers the optimizer keeps (AdamW's two moments per trained entry)."""
    if name == "torch":
        return sum(int(t.numel()) for st in state.optimizer.state.values() for k, t in st.items()
                   if k in ("exp_avg", "exp_avg_sq"))
    import jax

    from diptych.backends.jax.train import _adam_state

    adam = _adam_state(state.opt_state)
    return sum(int(x.size) for x in jax.tree.leaves((adam.mu, adam.nu)))


@pytest.mark.parametrize("name", BACKENDS)
def test_optimizer_holds_only_the_adapters_and_the_base_does_not_move(name):
    spec = tiny_spec("llama", **SUITE_SPEC)
    w = spec.init_weights(0)
    be, state = _lora_state(name, spec, w, OptimConfig(lr=1e-2, warmup_steps=0))
    adapters0 = be.export_adapters(state.model)
    n_adapter = sum(a.size for a in adapters0.values())
    assert n_adapter == sum(4 * (o + i) for o, i in _target_shapes(spec))  # r (out + in) per target linear
    state, m = be.train_step(state, [_sft_batch(spec.vocab_size)], "sft", SFTLossConfig())
    assert m["skipped"] == 0.0
    assert _optimizer_floats(name, state) == 2 * n_adapter  # mu and nu of the adapters, nothing of the base
    for _ in range(2):
        state, _ = be.train_step(state, [_sft_batch(spec.vocab_size)], "sft", SFTLossConfig())
    base = be.export(state.model)
    assert set(base) == set(w) and all(np.array_equal(base[k], w[k]) for k in w)  # bit-identical base
    moved = {k: float(np.abs(v - adapters0[k]).max()) for k, v in be.export_adapters(state.model).items()}
    assert min(moved.values()) > 1e-4  # every adapter (A and B) trained
    # the state's HF export is the merged model: base + scaling * B @ A
    merged = be.export_weights(state)
    ad = be.export_adapters(state.model)
    q = "model.layers.0.self_attn.q_proj"
    want = w[f"{q}.weight"] + LORA.scaling * ad[f"{q}.lora_B.weight"] @ ad[f"{q}.lora_A.weight"]
    np.testing.assert_allclose(merged[f"{q}.weight"], want, rtol=0, atol=1e-6)
    assert np.array_equal(merged["model.embed_tokens.weight"], w["model.embed_tokens.weight"])


def _target_shapes(spec) -> list[tuple[int, int]]:
    h, q, kv, f = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.intermediate_size
    per_layer = [(q, h), (kv, h), (kv, h), (h, q), (f, h), (f, h), (h, f)]
    return per_layer * spec.num_hidden_layers


@pytest.mark.parametrize("name", BACKENDS)
def test_bf16_mixed_precision_trains_float32_master_adapters(name):
    """Under bf16 the model runs bf16 (base and adapters); the optimizer's float32 master adapters are exported."""
    spec = tiny_spec("llama", **SUITE_SPEC)
    w = spec.init_weights(0)
    be, state = _lora_state(name, spec, w, OptimConfig(lr=1e-2, warmup_steps=0, mixed_precision="bf16"))
    state, m = be.train_step(state, [_sft_batch(spec.vocab_size)], "sft", SFTLossConfig())
    assert m["skipped"] == 0.0 and np.isfinite(m["loss"])
    assert be.lora_config(state.model) is not None
    merged = be.export_weights(state)
    assert set(merged) == set(w)
    assert not np.array_equal(merged["model.layers.0.mlp.down_proj.weight"], be.export(state.model)[
        "model.layers.0.mlp.down_proj.weight"])  # the adapters moved the merged weight


@both
@pytest.mark.slow
def test_lora_parity_suite_jax_equals_torch():
    """5 SFT and 5 GRPO steps with adapters: the loss of every step and the adapters after the last agree within
    the fp32 train tolerance, and on each backend the base stays bit-identical and the adapters-off reference
    scores exactly as the starting model (``diptych parity --suite lora``)."""
    import diptych.parity.train_suite  # noqa: F401  (registers the suites)
    from diptych.parity.harness import run_parity

    report = run_parity(tiny_spec("llama", **SUITE_SPEC), suites=["lora"], with_transformers=False)
    got = {c.quantity for c in report.cases}
    for case in ("sft", "grpo"):
        assert {f"loss:lora {case} steps 1-5", f"weights:lora {case} adapters after 5",
                f"loss:lora {case} base frozen, reference exact (jax)",
                f"loss:lora {case} base frozen, reference exact (torch)"} <= got
    assert report.passed, [(c.quantity, c.max_rel) for c in report.cases if not c.passed]
    assert all(c.tol == (0.0 if "exact" in c.quantity else 1e-4) for c in report.cases)


def test_lora_cases_are_not_vacuous():
    """The adapters really move and the GRPO loss is non-zero, so agreement means something."""
    from diptych.parity.train_suite import run_lora_case

    spec = tiny_spec("llama", **SUITE_SPEC)
    out = run_lora_case("grpo", get_backend("torch" if HAS_TORCH else "jax"), spec, spec.init_weights(0), "float32")
    assert abs(out["loss"][0]) > 1e-3 and out["base_unchanged"] and out["reference_exact"]
    assert np.abs(out["adapters"]).max() > 0 and out["loss"].shape == (5,)


@pytest.mark.parametrize("name", BACKENDS)
def test_short_grpo_run_with_lora_raises_a_dense_reward(name):
    """GRPOTrainer with a lora block and a KL term (reference = adapters off): reward goes up."""
    from diptych.core.tokenizer import CharTokenizer
    from diptych.core.trainers.api import GRPOTrainer
    from diptych.core.trainers.grpo import GRPOConfig

    be = get_backend(name)
    tok = CharTokenizer()
    # a wider init than tiny_spec's, so the residual stream the adapters read is not near zero
    spec = tiny_spec("llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     initializer_range=0.3)
    cfg = GRPOConfig(steps=12, prompts_per_step=4, num_generations=4, max_prompt_length=3, max_completion_length=4,
                     seed=1, loss_type="grpo", beta=0.04, optim=OptimConfig(lr=5e-2), lora=LoRAConfig(r=8, alpha=16.0))
    lowercase = lambda prompts, completions, **kw: [sum(ch.islower() for ch in c) / 4 for c in completions]
    trainer = GRPOTrainer(be.build(spec, spec.init_weights(0)), lowercase, args=cfg, backend=be, tokenizer=tok,
                          train_dataset=[{"prompt": f"{c}>"} for c in "bcdefghijk"])
    trainer.train()
    rewards = [h["reward"] for h in trainer.history]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1, rewards
    assert trainer.history[-1]["kl"] > 0  # the reference (adapters off) is not the trained policy
    base = be.export(trainer.state.model)
    w = spec.init_weights(0)
    assert all(np.array_equal(base[k], w[k]) for k in w)


@both
def test_recurrent_depth_model_trains_with_lora_on_both_backends_alike():
    from diptych.core.recurrent_spec import tiny_recurrent_spec

    spec = tiny_recurrent_spec()
    w = spec.init_weights(0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, spec.vocab_size, size=(2, 10)).astype(np.int32)
    batch = {"tokens": tokens, "attention_mask": np.ones_like(tokens), "mask": np.ones((2, 9), np.float32)}
    out = {}
    for name in ("jax", "torch"):
        be, state = _lora_state(name, spec, w, OptimConfig(lr=1e-2, warmup_steps=0), LoRAConfig(r=2, alpha=4.0))
        be.set_depth(state.model, 3, 2)
        losses = []
        for _ in range(3):
            state, m = be.train_step(state, [batch], "sft", SFTLossConfig())
            losses.append(m["loss"])
        base = be.export(state.model)
        assert all(np.array_equal(base[k], w[k]) for k in w), name
        out[name] = (np.asarray(losses), be.export_adapters(state.model))
    (lj, aj), (lt, at) = out["jax"], out["torch"]
    assert lt[-1] < lt[0]
    np.testing.assert_allclose(lj, lt, rtol=1e-4)
    assert set(aj) == set(at) and aj
    flat = lambda a: np.concatenate([a[k].astype(np.float64).ravel() for k in sorted(a)])
    rel = np.linalg.norm(flat(aj) - flat(at)) / np.linalg.norm(flat(at))  # as tests/recurrent's weight parity
    assert rel <= 1e-4, rel


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_cli_lora_target_matching_nothing_fails_in_one_line(tmp_path, capsys):
    from diptych.cli import main

    rc = main(["train", "sft", "--backend", "torch", "--quiet", f"out={tmp_path / 'run'}", "model.hidden_size=16",
               "model.num_hidden_layers=1", "model.num_attention_heads=2", "model.num_key_value_heads=1",
               "model.intermediate_size=32", "data.n_train=8", "data.n_test=2", "sft.steps=1", "sft.batch_size=2",
               "sft.lora.targets=nope"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "nope" in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # failed before step 1
