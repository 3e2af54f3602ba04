"""vLLM as the asynchronous generator (``async.generator: vllm``) against its oracles: the synchronous
``rollout: vllm`` run, and log-probs recomputed by the trainer with the saved weights of each version.

The vLLM tests need the vLLM environment (``scripts/vllm_env.sh``; ``.venv-vllm/bin/python -m pytest -q
tests/asyncrl/test_vllm_async.py``) and skip elsewhere; the refusals run everywhere. One colocated engine (a module
fixture) serves the synchronous runs and the swap test; the asynchronous runs that go through the orchestrator's
own path start their generator's engine themselves, as a user's run does.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import needs_jax
from helpers import ROWS, TOK, Recorder, train_recording_groups, variety

from diptych.asyncrl.config import AsyncConfig
from diptych.asyncrl.orchestrator import AsyncGRPO, Phases
from diptych.asyncrl.placement import ThreadGenerator
from diptych.asyncrl.vllm_generator import VLLMGenerator
from diptych.core.backend import get_backend
from diptych.core.optim import OptimConfig
from diptych.core.recurrent_spec import tiny_recurrent_spec
from diptych.core.spec import tiny_spec
from diptych.core.trainers import grpo
from diptych.core.trainers.base import TrainerError, sequence_logprobs
from diptych.core.trainers.grpo import GRPOConfig, train_grpo
from diptych.rollout import RolloutEngineError, VLLMConfig
from diptych.rollout import vllm_engine as vllm_engine_module

needs_vllm = pytest.mark.skipif(not vllm_engine_module.vllm_installed(), reason="vLLM not installed "
                                "(scripts/vllm_env.sh builds .venv-vllm)")

# head_dim 32: vLLM's CPU attention has no kernel below 32 (the async tests' usual tiny model has 16).
SPEC = tiny_spec("llama", vocab_size=TOK.vocab_size, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=128, num_hidden_layers=1, max_position_embeddings=128, initializer_range=0.05,
                 bos_token_id=TOK.bos_id, eos_token_id=TOK.eos_id, pad_token_id=TOK.pad_id)


def config(steps: int = 3, completion: int = 4, **async_kw) -> GRPOConfig:
    """The async tests' tiny GRPO run, sampled by vLLM (temperature 1: seeded draws, not greedy)."""
    return GRPOConfig(steps=steps, prompts_per_step=2, num_generations=4, max_prompt_length=6,
                      max_completion_length=completion, seed=3, optim=OptimConfig(lr=1e-2), rollout="vllm",
                      vllm=VLLMConfig(), async_=AsyncConfig(**async_kw) if async_kw else AsyncConfig())


def fresh_state(backend):
    return backend.init_train_state(backend.build(SPEC, SPEC.init_weights(0)), OptimConfig(lr=1e-2))


def run(backend, cfg, **kw):
    """Train from the seed weights; returns (final canonical weights, metrics by step, every trained batch)."""
    rec, batches = Recorder(), []
    train_step = backend.train_step

    def spy(st, mbs, *a, **k):
        batches.append({key: np.concatenate([np.asarray(mb[key]) for mb in mbs]) for key in mbs[0]})
        return train_step(st, mbs, *a, **k)

    backend.train_step = spy
    try:
        state = train_grpo(backend, fresh_state(backend), TOK, variety, ROWS, cfg, rec, **kw)
    finally:
        del backend.train_step
    return backend.export_weights(state), rec.rows, batches


@pytest.fixture(scope="module")
def engine():
    pytest.importorskip("vllm")
    eng = vllm_engine_module.VLLMEngine(SPEC, SPEC.init_weights(0), sampling=config().sampling(TOK),
                                        max_model_len=64)
    yield eng
    eng.close()


_SYNC: dict[tuple[str, int], tuple] = {}


def sync_run(engine, name: str = "torch", steps: int = 3):
    """The oracle: synchronous GRPO with ``rollout: vllm`` on the shared engine (computed once per backend)."""
    if (name, steps) not in _SYNC:
        _SYNC[name, steps] = run(get_backend(name), config(steps=steps), engine=engine)
    return _SYNC[name, steps]


def assert_same_run(sync, other, steps: int) -> None:
    (w_s, m_s, b_s), (w_a, m_a, b_a) = sync, other
    assert len(b_a) == steps
    for bs, ba in zip(b_s, b_a):
        for key in ("tokens", "attention_mask", "mask", "sampler_logprobs", "advantages"):
            np.testing.assert_array_equal(bs[key], ba[key], err_msg=key)
    assert [m_s[s]["reward"] for s in range(1, steps + 1)] == [m_a[s]["reward"] for s in range(1, steps + 1)]
    if steps == len(b_s):
        for k in w_s:
            np.testing.assert_array_equal(w_s[k], w_a[k], err_msg=k)


@needs_vllm
@pytest.mark.parametrize("name", ["torch", pytest.param("jax", marks=[needs_jax, pytest.mark.slow])])  # jax: 15-40 s
def test_max_staleness_0_with_the_vllm_generator_equals_the_synchronous_vllm_run(engine, name):
    """Same rollouts (every trained token array, sampled at temperature 1), same rewards, same weights after 3
    steps, exactly. The generator thread starts its own engine on the published weights and streams each job as
    one generate call of the synchronous loop would build it (same rows, same per-row seeds), and at staleness 0 a
    job runs alone on the weights the synchronous loop has; vLLM's seeded sampling is per request, so a second
    engine draws the same tokens."""
    oracle = sync_run(engine, name)
    w_s = oracle[0]
    assert max(float(np.abs(w_s[k] - SPEC.init_weights(0)[k]).max()) for k in w_s) > 1e-4  # the weights moved
    other = run(get_backend(name), config(steps=3, enabled=True, max_staleness=0, generator="vllm"))
    assert_same_run(oracle, other, 3)
    for m in other[1].values():
        assert m["async/staleness_max"] == 0.0 and m["async/generator_tokens_per_s"] > 0


@needs_vllm
@pytest.mark.slow  # a spawned generator process imports vLLM and starts its engine: 30-90 s on a loaded machine
def test_the_vllm_generator_in_its_own_process_equals_the_synchronous_run(engine):
    """placement: process: the generator process builds its own engine from the weights in shared memory."""
    other = run(get_backend("torch"), config(steps=2, enabled=True, max_staleness=0, generator="vllm",
                                             placement="process"))
    assert_same_run(sync_run(engine), other, 2)


class _SharedEngineSpec:
    """A generator spec whose vLLM generator drives the module's engine (no second engine start)."""

    def __init__(self, engine, cfg, step_delay_s):
        self.engine, self.cfg, self.step_delay_s = engine, cfg, step_delay_s

    def build(self, backend):
        return VLLMGenerator(backend, SPEC, TOK, self.cfg, recompute_kv=self.cfg.async_.recompute_kv,
                             step_delay_s=self.step_delay_s, engine=self.engine)


def _swap_run(engine, recompute_kv: bool):
    """4 async steps with a scripted slow engine step (0.1 s) and 12-token completions, so the trainer's steps land
    while rows decode; returns the trained groups, a model of every version, the completions that span two
    versions (group, row), the config and the saved weights of every version."""
    backend = get_backend("torch")
    cfg = config(steps=4, completion=12, enabled=True, max_staleness=2, generator="vllm", recompute_kv=recompute_kv)
    saved: dict[int, dict[str, np.ndarray]] = {}
    gen = ThreadGenerator(_SharedEngineSpec(engine, cfg, 0.1), backend)
    phases = Phases(sample=grpo.sample_rollout, score=grpo.score, advantages=grpo.advantage_batch,
                    train=grpo.train_on_batch)
    run_ = AsyncGRPO(backend, fresh_state(backend), TOK, variety, ROWS, cfg, phases, generator=gen,
                     on_publish=lambda v, w: saved.__setitem__(v, {k: np.array(x) for k, x in w.items()}))
    rec = Recorder()
    trained = train_recording_groups(run_, rec)
    mixed = [(g, r) for g in trained for r in range(len(g.arrays["mask"]))
             if len(np.unique(g.arrays["versions"][r][g.arrays["mask"][r] > 0])) > 1]
    assert mixed, "no completion spans two weight versions: the swap did not land mid-generation"
    # the versions are the trainer's (0 .. steps - 1), not the shared engine's own counter
    assert {int(v) for g in trained for v in np.unique(g.arrays["versions"][g.arrays["mask"] > 0])} <= set(saved)
    assert max(m["async/staleness_max"] for m in rec.rows.values()) <= 2
    assert not engine.streaming  # the run's rows are drained from the shared engine
    return trained, {v: backend.build(SPEC, w) for v, w in saved.items()}, mixed, cfg, saved


def _recomputed(model, arrays, on, temperature):
    return sequence_logprobs(get_backend("torch"), model, arrays["tokens"], arrays["attention_mask"],
                             on.astype(np.float32), temperature)


@needs_vllm
def test_weights_swapped_mid_generation_give_rows_of_two_versions_with_the_right_logprobs(engine):
    """``recompute_kv``: vLLM rebuilds the rows' K/V at each swap, so every token's recorded behaviour log-prob must
    be what a clean forward of the saved weights of its version gives: checked within 1e-5 (fp32 vLLM against the
    torch trainer; measured here: 5e-7), while the first version's weights are more than 1e-3 off on a mixed row's
    later tokens (the oracle tells the versions apart)."""
    trained, models, mixed, cfg, _ = _swap_run(engine, recompute_kv=True)
    checked = 0
    for g in trained:
        a = g.arrays
        for v in np.unique(a["versions"][a["mask"] > 0]):
            on = (a["versions"] == v) & (a["mask"] > 0)
            lp = _recomputed(models[int(v)], a, on, cfg.temperature)
            np.testing.assert_allclose(a["sampler_logprobs"][on], lp[on], atol=1e-5)
            checked += int(on.sum())
    assert checked == sum(int(g.arrays["mask"].sum()) for g in trained)
    g, r = mixed[0]
    a = {k: v[r:r + 1] for k, v in g.arrays.items()}
    v = a["versions"][a["mask"] > 0]
    later = (a["versions"] > v.min()) & (a["mask"] > 0)
    lp = _recomputed(models[int(v.min())], a, later, cfg.temperature)
    assert float(np.abs(lp - a["sampler_logprobs"])[later].max()) > 1e-3


def _rope(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    d = x.shape[-1]
    ang = pos / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    cos, sin = np.concatenate([np.cos(ang)] * 2), np.concatenate([np.sin(ang)] * 2)
    return x * cos + np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


def _kept_kv_logprobs(weights: dict[int, dict[str, np.ndarray]], prompt: list[int], completion: list[int],
                      versions: list[int], temperature: float) -> np.ndarray:
    """A numpy transcription of the one-layer llama (SPEC) with the K/V cache kept across swaps: position ``p``'s
    K/V come from the weights of the forward that took ``p`` as input (the prompt's: the first token's version;
    completion token ``k``'s: token ``k + 1``'s version), and token ``t`` is scored by its own version's weights
    attending to them. Returns the log-prob of every completion token."""
    seq = list(prompt) + list(completion)
    n_p, heads, kv_heads, hd = len(prompt), SPEC.num_attention_heads, SPEC.num_key_value_heads, SPEC.head_dim
    pos_version = [versions[0]] * n_p + list(versions[1:])

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + SPEC.rms_norm_eps) * w

    def layer(v):
        w = {k: v_.astype(np.float64) for k, v_ in weights[v].items()}
        return w, "model.layers.0."

    out = []
    for t, tok in enumerate(completion):
        q_pos = n_p + t - 1
        keys, vals = [], []
        for p in range(q_pos + 1):
            w, L = layer(pos_version[p])
            x = norm(w["model.embed_tokens.weight"][seq[p]], w[L + "input_layernorm.weight"])
            k = (w[L + "self_attn.k_proj.weight"] @ x).reshape(kv_heads, hd)
            keys.append(np.stack([_rope(k[h], p, SPEC.rope_theta) for h in range(kv_heads)]))
            vals.append((w[L + "self_attn.v_proj.weight"] @ x).reshape(kv_heads, hd))
        keys_, vals_ = np.stack(keys, 1), np.stack(vals, 1)  # [kv_heads, positions, hd]
        w, L = layer(versions[t])
        h = w["model.embed_tokens.weight"][seq[q_pos]]
        q = (w[L + "self_attn.q_proj.weight"] @ norm(h, w[L + "input_layernorm.weight"])).reshape(heads, hd)
        att = []
        for hh in range(heads):
            kv = hh // (heads // kv_heads)
            score = keys_[kv] @ _rope(q[hh], q_pos, SPEC.rope_theta) / np.sqrt(hd)
            prob = np.exp(score - score.max())
            att.append((prob / prob.sum()) @ vals_[kv])
        h = h + w[L + "self_attn.o_proj.weight"] @ np.concatenate(att)
        x = norm(h, w[L + "post_attention_layernorm.weight"])
        gate = w[L + "mlp.gate_proj.weight"] @ x
        h = h + w[L + "mlp.down_proj.weight"] @ (gate / (1 + np.exp(-gate)) * (w[L + "mlp.up_proj.weight"] @ x))
        logits = w["lm_head.weight"] @ norm(h, w["model.norm.weight"]) / temperature
        m = logits.max()
        out.append(logits[tok] - m - np.log(np.exp(logits - m).sum()))
    return np.asarray(out)


@needs_vllm
def test_weights_swapped_mid_generation_keep_the_kv_cache_by_default(engine):
    """Magistral's choice (``recompute_kv`` off): the rows keep the K/V their earlier tokens were computed with.
    Oracle: a numpy transcription of the model that scores each token with its version's weights attending to K/V
    written by the versions that were live when each position went in (:func:`_kept_kv_logprobs`); every recorded
    behaviour log-prob of a mixed row matches it within 1e-5 (measured: 7e-7), while a clean forward of the
    token's version is more than 1e-3 off somewhere (so the cache really was kept). Once the rows have drained,
    the prefix cache that could not be reset under them is reset."""
    _, models, mixed, cfg, saved = _swap_run(engine, recompute_kv=False)
    clean_gap = 0.0
    for g, r in mixed:
        a = g.arrays
        on = a["mask"][r] > 0
        toks = a["tokens"][r]
        prompt = [int(x) for x, m in zip(toks[:cfg.max_prompt_length], a["attention_mask"][r]) if m]
        completion = [int(x) for x in toks[1:][on]]
        versions = [int(x) for x in a["versions"][r][on]]
        want = _kept_kv_logprobs(saved, prompt, completion, versions, cfg.temperature)
        np.testing.assert_allclose(a["sampler_logprobs"][r][on], want, atol=1e-5)
        row = {k: x[r:r + 1] for k, x in a.items()}
        for v in set(versions[1:]) - {versions[0]}:
            mask = (row["versions"] == v) & (row["mask"] > 0)
            lp = _recomputed(models[v], row, mask, cfg.temperature)
            clean_gap = max(clean_gap, float(np.abs(lp - row["sampler_logprobs"])[mask].max()))
    assert clean_gap > 1e-3, "the tokens after a swap are a clean forward of the new weights: the K/V was not kept"
    assert not engine._stale_prefix


def _cfg_error(**kw) -> str:
    with pytest.raises((TrainerError, RolloutEngineError)) as e:
        GRPOConfig(**kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_refusals_are_one_line_and_say_what_to_change(monkeypatch):
    """What the vLLM generator cannot serve is refused when the config is built (these run without vLLM too)."""
    vllm_gen = dict(enabled=True, generator="vllm")
    assert "set rollout=vllm" in _cfg_error(async_=AsyncConfig(**vllm_gen))
    assert "async.generator=vllm" in _cfg_error(rollout="vllm", async_=AsyncConfig(enabled=True))  # batch + vLLM
    monkeypatch.setattr(vllm_engine_module, "vllm_installed", lambda: False)
    msg = _cfg_error(rollout="vllm", async_=AsyncConfig(**vllm_gen))
    assert "not installed" in msg and "scripts/vllm_env.sh" in msg and "diptych[vllm]" in msg
    monkeypatch.setattr(vllm_engine_module, "vllm_installed", lambda: True)
    assert "vllm.mode=colocated" in _cfg_error(rollout="vllm", vllm={"mode": "server"},
                                               async_=AsyncConfig(**vllm_gen))
    assert "placement thread or process" in _cfg_error(rollout="vllm", async_=AsyncConfig(**vllm_gen,
                                                                                         placement="ray"))
    assert "parity" in _cfg_error(rollout="vllm", parity=True, async_=AsyncConfig(**vllm_gen))
    cfg = dataclasses.replace(config(), async_=AsyncConfig())  # a valid config; the model is what vLLM refuses
    with pytest.raises(RolloutEngineError, match=r"recurrent-depth.*rollout: native") as e:
        VLLMGenerator(get_backend("torch"), tiny_recurrent_spec(), TOK, cfg)
    assert "\n" not in str(e.value)


def test_the_continuous_generator_at_max_staleness_0_drops_no_group():
    """Both streaming generators (vLLM's and the native continuous one) poll for weights after a job arrives, not
    only before: the trainer publishes before it frees the slots, so a job handed over after a step must start
    on that step's weights. Polling only before the wait let every job after the first start one version stale, and
    at max_staleness 0 all its groups were dropped (2 per step here). Native sampler: runs without vLLM."""
    from helpers import config as native_config
    from helpers import run as native_run

    _, metrics, _ = native_run(get_backend("torch"), native_config(steps=3, enabled=True, max_staleness=0,
                                                                   generator="continuous"))
    assert [metrics[s]["async/groups_dropped"] for s in (1, 2, 3)] == [0.0, 0.0, 0.0]
    assert [metrics[s]["async/staleness_max"] for s in (1, 2, 3)] == [0.0, 0.0, 0.0]
