"""LoRA dropout on both backends (PEFT's ``base(x) + scaling * B A dropout(x)``): it acts in the train step only,
so a step's loss and gradient change with it while sampling and log-probs of the trained model do not; the dropped
fraction is ``p`` and the kept inputs are scaled by ``1 / (1 - p)`` (an identity adapter on a zero base shows the
mask itself); masks come from ``(seed, step, micro-batch)``, so the same seed repeats a run bit for bit, another
seed does not, and a run saved at step 2 and resumed to step 4 equals the straight 4-step run; a recurrent-depth
model trains with dropout on JAX (each recurrence draws its own masks)."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core.backend import get_backend
from diptych.core.lora import LoRAConfig
from diptych.core.losses import SFTLossConfig
from diptych.core.optim import OptimConfig
from diptych.core.sampling import SamplingConfig
from diptych.core.spec import tiny_spec
from tests.conftest import HAS_JAX, HAS_TORCH
from tests.lora.conftest import lora_module, random_adapters, to_np

BACKENDS = [pytest.param("jax", marks=pytest.mark.skipif(not HAS_JAX, reason="jax extra not installed")),
            pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="torch not installed"))]
needs_jax = pytest.mark.skipif(not HAS_JAX, reason="jax extra not installed")
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
SUITE_SPEC = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
"""One small layer: JAX compiles a step per (config, remat), so the layer count is most of this file's time."""
P = 0.3
DROP = LoRAConfig(r=4, alpha=8.0, dropout=P)
PLAIN = LoRAConfig(r=4, alpha=8.0)
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0)


def _spec():
    spec = tiny_spec("llama", **SUITE_SPEC)
    return spec, spec.init_weights(0)


def _sft_batch(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    from diptych.parity.train_suite import sft_rows

    return sft_rows(vocab, seed) if seed else sft_rows(vocab)  # sft_rows' own default seed for 0


def _state(name: str, lora: LoRAConfig, *, seed: int = 0, adapters=None):
    be = get_backend(name)
    spec, w = _spec()
    model = be.build(spec, w, **({"device": "cpu"} if name == "torch" else {}))
    model = be.apply_lora(model, lora, adapters=adapters, seed=0)
    return be, be.init_train_state(model, OPTIM, seed=seed)


def _acting_adapters(name: str) -> dict[str, np.ndarray]:
    """Adapters with B nonzero, so the adapter branch (and its dropout) moves the loss itself."""
    be, state = _state(name, PLAIN)
    return random_adapters(be.export_adapters(state.model), seed=2, scale=0.3)


def _train(be, state, steps: int, start: int = 0):
    for i in range(start, steps):
        state, m = be.train_step(state, [_sft_batch(state.spec.vocab_size, 1 + i), _sft_batch(state.spec.vocab_size,
                                                                                                 50 + i)],
                                 "sft", SFTLossConfig())
        assert m["skipped"] == 0.0
    return state


def _flat(adapters: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([adapters[k].ravel() for k in sorted(adapters)])


# -- a train step drops, everything else does not ------------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
def test_dropout_changes_the_step_but_not_scoring_or_sampling(name):
    adapters = _acting_adapters(name)
    batch = [_sft_batch(SUITE_SPEC["vocab_size"])]
    be, plain = _state(name, PLAIN, adapters=adapters)
    _, dropped = _state(name, DROP, adapters=adapters)
    g0, loss0 = be.gradients(plain, batch, "sft", SFTLossConfig())
    g1, loss1 = be.gradients(dropped, batch, "sft", SFTLossConfig())
    assert abs(loss1 - loss0) > 1e-4 * abs(loss0)  # the adapter acts on dropout(x): the step's loss changes
    assert np.abs(_flat(g1) - _flat(g0)).max() > 1e-3 * np.abs(_flat(g0)).max()
    g1b, loss1b = be.gradients(dropped, batch, "sft", SFTLossConfig())  # same (seed, step, micro): same masks
    assert loss1b == loss1 and np.array_equal(_flat(g1b), _flat(g1))

    # the model after a dropout step scores and samples exactly as the same adapters without dropout
    dropped = _train(be, dropped, 1)
    trained = be.export_adapters(dropped.model)
    _, twin = _state(name, PLAIN, adapters=trained)
    tokens, mask = batch[0]["tokens"], batch[0]["attention_mask"]
    targets = tokens[:, 1:]
    lp = to_np(be.logprobs(dropped.model, tokens[:, :-1], mask[:, :-1], targets))
    np.testing.assert_array_equal(lp, to_np(be.logprobs(twin.model, tokens[:, :-1], mask[:, :-1], targets)))
    np.testing.assert_array_equal(lp, to_np(be.logprobs(dropped.model, tokens[:, :-1], mask[:, :-1], targets)))
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, eos_ids=())
    prompts = [[5, 6, 7], [9, 10]]
    a = be.generate(dropped.model, prompts, sampling, seed=4)
    b = be.generate(twin.model, prompts, sampling, seed=4)
    np.testing.assert_array_equal(a.completion_tokens, b.completion_tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)


@pytest.mark.parametrize("name", BACKENDS)
def test_remat_recomputes_the_forwards_masks(name):
    """With activation checkpointing the backward recomputes each layer: it must redraw the very masks the forward
    drew (JAX: the same key; torch: the RNG state ``torch.utils.checkpoint`` stashed), or the gradient is wrong."""
    be = get_backend(name)
    spec, w = _spec()
    adapters = _acting_adapters(name)
    batch = [_sft_batch(spec.vocab_size)]
    grads = {}
    for remat in ("none", "layer"):
        model = be.apply_lora(be.build(spec, w, **({"device": "cpu"} if name == "torch" else {})), DROP,
                              adapters=adapters)
        grads[remat] = be.gradients(be.init_train_state(model, OPTIM, seed=5, remat=remat), batch, "sft",
                                    SFTLossConfig())
    (g0, l0), (g1, l1) = grads["none"], grads["layer"]
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    np.testing.assert_allclose(_flat(g1), _flat(g0), rtol=1e-5, atol=1e-6 * np.abs(_flat(g0)).max())


# -- the mask itself: an identity adapter on a zero base ---------------------------------------------------
def _mask_oracle(out: np.ndarray, p: float) -> None:
    """``out`` is ``dropout(ones)``: a ``p`` fraction zeroed (4 binomial sigmas), the rest exactly 1 / (1 - p)."""
    zero = out == 0
    n = out.size
    assert abs(zero.mean() - p) < 4 * np.sqrt(p * (1 - p) / n), zero.mean()
    np.testing.assert_allclose(out[~zero], 1.0 / (1.0 - p), rtol=1e-6, atol=0)
    assert zero.any(axis=0).all() and not zero.all(axis=0).any()  # every feature dropped somewhere, kept elsewhere


@needs_jax
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_jax_mask_drops_p_and_scales_the_rest(p):
    import jax.numpy as jnp

    from diptych.backends.jax.model import Linear

    L = lora_module("jax")
    n = 32
    base = Linear(n, n, bias=False)  # a zero weight
    layer = L.LoRALinear(base, jnp.eye(n), jnp.eye(n), 1.0, dropout=p)
    x = jnp.ones((512, n))
    np.testing.assert_array_equal(np.asarray(layer(x)), np.ones((512, n)))  # no key installed: no dropout
    layer.dropout_rng = L.DropoutRng(L.module_key(jnp.asarray(np.array([0, 7], np.uint32)), "m"))
    out = np.asarray(layer(x))
    _mask_oracle(out, p)
    layer.dropout_rng = L.DropoutRng(L.module_key(jnp.asarray(np.array([0, 8], np.uint32)), "m"))
    assert not np.array_equal(np.asarray(layer(x)) == 0, out == 0)  # another key, another mask


@needs_torch
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_torch_mask_drops_p_and_scales_the_rest(p):
    import torch
    from torch import nn

    L = lora_module("torch")
    n = 32
    base = nn.Linear(n, n, bias=False)
    with torch.no_grad():
        base.weight.zero_()
    holder = nn.Module()
    holder.layer = L.LoRALinear(base, torch.eye(n), torch.eye(n), 1.0, p)
    holder.lora_cfg = LoRAConfig(r=n, alpha=float(n), dropout=p)
    x = torch.ones(512, n)
    before = torch.random.get_rng_state()
    np.testing.assert_array_equal(holder.layer(x).detach().numpy(), np.ones((512, n)))  # train mode, no context
    with L.training_dropout(holder, L.dropout_seed(0, 3, 1)):
        out = holder.layer(x).detach().numpy()
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is forked, not consumed
    _mask_oracle(out, p)
    with L.training_dropout(holder, L.dropout_seed(0, 3, 1)):
        np.testing.assert_array_equal(holder.layer(x).detach().numpy(), out)  # the seed fixes the mask
    with L.training_dropout(holder, L.dropout_seed(0, 4, 1)):
        assert not np.array_equal(holder.layer(x).detach().numpy() == 0, out == 0)


# -- reproducible per seed, exact across a resume ----------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
def test_same_seed_same_weights_other_seed_other_weights(name, monkeypatch):
    be, a = _state(name, DROP, seed=11)
    traces = []
    if name == "jax":  # the key is installed while tracing only: one trace for every step and micro-batch
        L = lora_module("jax")
        install = L.set_dropout_rng
        monkeypatch.setattr(L, "set_dropout_rng", lambda model, key: (traces.append(1), install(model, key))[1])
    a = _train(be, a, 2)
    assert len(traces) <= 1, len(traces)  # 2 steps x 2 micro-batches: a retrace per key would count 4
    _, b = _state(name, DROP, seed=11)
    b = _train(be, b, 2)
    _, c = _state(name, DROP, seed=12)
    c = _train(be, c, 2)
    wa, wb, wc = (_flat(be.export_adapters(s.model)) for s in (a, b, c))
    assert np.array_equal(wa, wb)
    assert np.abs(wa - wc).max() > 1e-6


@pytest.mark.parametrize("name", BACKENDS)
def test_a_checkpoint_keeps_the_seed(name, tmp_path):
    be, state = _state(name, DROP, seed=7)
    be.save(state, tmp_path / "step_0")
    assert be.restore(tmp_path / "step_0")[0].seed == 7


@pytest.mark.parametrize("name", BACKENDS)
def test_saved_at_step_2_and_resumed_to_4_equals_the_straight_run(name, tmp_path):
    be, straight = _state(name, DROP, seed=7)
    straight = _train(be, straight, 4)
    _, cut = _state(name, DROP, seed=7)
    cut = _train(be, cut, 2)
    be.save(cut, tmp_path / "step_2")
    resumed, _ = be.restore(tmp_path / "step_2")
    assert resumed.step == 2
    resumed = _train(be, resumed, 4, start=2)
    a, b = be.export_adapters(straight.model), be.export_adapters(resumed.model)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # (that the masks act, and differ per seed, is test_same_seed_same_weights_other_seed_other_weights's)


# -- recurrent-depth models on JAX ---------------------------------------------------------------------------
@needs_jax
def test_recurrent_model_trains_with_dropout():
    from diptych.core.recurrent_spec import tiny_recurrent_spec

    be = get_backend("jax")
    spec = tiny_recurrent_spec()
    w = spec.init_weights(0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, spec.vocab_size, size=(2, 10)).astype(np.int32)
    batch = {"tokens": tokens, "attention_mask": np.ones_like(tokens), "mask": np.ones((2, 9), np.float32)}
    lora = LoRAConfig(r=2, alpha=4.0, dropout=0.5)
    plain = LoRAConfig(r=2, alpha=4.0)
    adapters = random_adapters(be.export_adapters(be.apply_lora(be.build(spec, w), plain)), seed=3, scale=1.0)

    def state(cfg, seed=0):
        st = be.init_train_state(be.apply_lora(be.build(spec, w), cfg, adapters=adapters), OPTIM, seed=seed)
        be.set_depth(st.model, 3, 2)  # one untaped iteration (fori_loop), two differentiated (scan)
        return st

    # the masks act (another seed, another loss and gradient) and repeat (the same seed, the same ones); one
    # compiled step for all three, as the key is an argument
    g1, l1 = be.gradients(state(lora), [batch], "sft", SFTLossConfig())
    g2, l2 = be.gradients(state(lora, seed=1), [batch], "sft", SFTLossConfig())
    assert abs(l1 - l2) > 1e-4 * abs(l1) and np.abs(_flat(g1) - _flat(g2)).max() > 1e-4
    g1b, l1b = be.gradients(state(lora), [batch], "sft", SFTLossConfig())
    assert l1b == l1 and np.array_equal(_flat(g1b), _flat(g1))
    st = state(lora)
    for _ in range(2):
        st, m = be.train_step(st, [batch], "sft", SFTLossConfig())
        assert np.isfinite(m["loss"]) and m["skipped"] == 0.0
    base = be.export(st.model)
    assert all(np.array_equal(base[k], w[k]) for k in w)  # the base stays frozen
    assert _flat(be.export_adapters(st.model)).tolist() != _flat(adapters).tolist()  # the adapters trained
    # outside the step the stored model carries no key, so its view is the merged (dropout-free) weights
    view = st.model.param_dict()
    assert view.rng is None and view.dropout == 0.5


@needs_jax
def test_recurrent_iterations_draw_their_own_masks():
    """The LoRA view folds the recurrence index into its key: iteration 0 and 1 drop different inputs."""
    import jax.numpy as jnp

    L = lora_module("jax")
    n = 16
    view = L.LoRAParams({"m.weight": jnp.zeros((n, n))}, {"m": (jnp.eye(n), jnp.eye(n))}, 1.0,
                        jnp.asarray(np.array([0, 1], np.uint32)), 0.5)
    x = jnp.ones((64, n))
    first, second = (np.asarray(view.iteration(i).linear("m.weight", x)) for i in (0, 1))
    _mask_oracle(first, 0.5)
    assert not np.array_equal(first == 0, second == 0)
    np.testing.assert_array_equal(np.asarray(view.iteration(0).linear("m.weight", x)), first)
    merged = L.LoRAParams({"m.weight": jnp.zeros((n, n))}, {"m": (jnp.eye(n), jnp.eye(n))}, 1.0, None, 0.5)
    np.testing.assert_array_equal(np.asarray(merged.linear("m.weight", x)), np.ones((64, n)))  # no key: no drop


# -- through the trainer: a killed GRPO run with dropout resumes exactly --------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", BACKENDS)
def test_killed_and_resumed_grpo_run_with_dropout_equals_the_uninterrupted_run(name, tmp_path, monkeypatch):
    """The trainers' own checkpoint path (seed 3, a KL term, two micro-batches): the masks after the resume are
    the uninterrupted run's, so losses and adapters agree bit for bit."""
    from diptych.core.trainers.base import DivergenceGuard
    from tests.lora.test_lora_checkpoint import LORA, STEPS, Killed, grpo_trainer

    be = get_backend(name)
    lora = LoRAConfig(r=LORA.r, alpha=LORA.alpha, targets=LORA.targets, dropout=0.2)
    full = grpo_trainer(be, tmp_path / "full", STEPS, lora=lora)
    full.train()
    check = DivergenceGuard.check

    def dies_after_step_3(self, step, metrics, state=None):
        check(self, step, metrics, state)
        if step == 3:
            raise Killed(step)

    monkeypatch.setattr(DivergenceGuard, "check", dies_after_step_3)
    with pytest.raises(Killed):
        grpo_trainer(be, tmp_path / "cut", STEPS, lora=lora).train()
    monkeypatch.setattr(DivergenceGuard, "check", check)
    resumed = grpo_trainer(be, tmp_path / "cut", STEPS, lora=lora, resume=True)
    resumed.train()
    by_step = lambda h: {int(r["step"]): r for r in h}
    a, b = by_step(full.history), by_step(resumed.history)
    assert all(a[s]["loss"] == b[s]["loss"] for s in (3, 4)), [(a[s]["loss"], b[s]["loss"]) for s in (3, 4)]
    fa, fb = be.export_adapters(full.state.model), be.export_adapters(resumed.state.model)
    assert set(fa) == set(fb) and all(np.array_equal(fa[k], fb[k]) for k in fa)
