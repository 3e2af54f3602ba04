"""vLLM as the rollout engine (issue 17), on CPU with the CPU build and a tiny model.

Needs the vLLM environment (``scripts/vllm_env.sh``; run ``.venv-vllm/bin/python -m pytest tests/rollout``);
in the main environment the module skips. One colocated engine serves the whole module (starting one
costs ~3 s on a quiet machine, ~40 s on a loaded one), re-synced to whichever weights a test needs; it has
vLLM's LoRA slots (rank 8), which a request without an adapter does not touch. Server mode starts one more
engine in a subprocess.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from diptych.core.backend import get_backend
from diptych.core.lora import LoRAConfig
from diptych.core.optim import OptimConfig
from diptych.core.recurrent_spec import tiny_recurrent_spec
from diptych.core.sampling import SamplingConfig, SamplingError
from diptych.core.spec import tiny_spec
from diptych.core.tokenizer import CharTokenizer
from diptych.core.trainers.base import encode_prompts, rollout_batch, sequence_logprobs
from diptych.core.trainers.grpo import GRPOConfig, grpo_step, train_grpo
from diptych.rollout import RolloutEngineError, VLLMConfig
from diptych.rollout.base import push_weights, sync_metrics
from diptych.rollout.vllm_engine import VLLMEngine
from tests.conftest import BACKENDS, needs_jax, needs_torch

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # as diptych.rollout sets it: stdout is for results
pytest.importorskip("vllm")  # vLLM's in-process settings are made by diptych.rollout.vllm_engine

TOK = CharTokenizer()
# head_dim 32: vLLM's CPU attention has no kernel below 32 (the repo's usual tiny model has 16).
SPEC = tiny_spec("llama", vocab_size=TOK.vocab_size, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=128, num_hidden_layers=1, max_position_embeddings=128, initializer_range=0.05,
                 bos_token_id=TOK.bos_id, eos_token_id=TOK.eos_id, pad_token_id=TOK.pad_id)
MAX_LEN = 64  # below the context, so the engine's own bound is what a long request hits
PROMPTS = [[1, 40, 41, 42], [1, 50, 51, 52, 53, 54, 55], [1, 60]]
GREEDY = SamplingConfig(max_new_tokens=16, temperature=0, eos_ids=())
ROWS = [{"prompt": f"{c}>"} for c in "bcdefghijk"]


def lowercase(prompts, completions, **columns):
    """Share of lowercase letters among 4 slots: dense (~20% for a random char model)."""
    return [sum(ch.islower() for ch in c) / 4 for c in completions]


@pytest.fixture(scope="module")
def engine():
    import torch

    before = (torch.get_num_threads(), np.random.get_state()[1].copy(), torch.random.get_rng_state().clone())
    # block_size 32 (CPU default 128): prompts of 40 tokens then fill a cached prefix block
    eng = VLLMEngine(SPEC, SPEC.init_weights(0), sampling=SamplingConfig(temperature=1.0), max_model_len=MAX_LEN,
                     block_size=32, lora=LoRAConfig(r=8))
    eng.globals_before = before
    eng.globals_after = (torch.get_num_threads(), np.random.get_state()[1].copy(), torch.random.get_rng_state().clone())
    yield eng
    eng.close()


def test_starting_vllm_leaves_the_trainers_threads_and_rngs_alone(engine):
    """vLLM in-process pins torch to one thread and seeds the global RNGs; the engine undoes both."""
    (t0, np0, torch0), (t1, np1, torch1) = engine.globals_before, engine.globals_after
    assert t1 == t0 and np.array_equal(np1, np0) and bool((torch1 == torch0).all())


def push(engine, weights):
    """Sync ``weights`` as the next version (the module's engine is shared, so versions keep rising)."""
    engine.sync_weights(weights, engine.weight_version + 1)
    return engine.weight_version


def trainer_logprobs(backend, model, rollout, width: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """The trainer's recomputed log-probs of a rollout and the sampler's, both on the completion mask."""
    batch = rollout_batch(rollout, width)
    lp = sequence_logprobs(backend, model, batch["tokens"], batch["attention_mask"], batch["mask"], temperature)
    keep = batch["mask"] > 0
    return lp[keep], batch["sampler_logprobs"][keep]


@pytest.mark.parametrize("name", BACKENDS)
def test_greedy_tokens_equal_the_native_sampler_on_each_backends_weights(engine, name):
    backend = get_backend(name)
    model = backend.build(SPEC, SPEC.init_weights(11 if name == "jax" else 12))
    version = push(engine, backend.export(model))  # the backend's canonical export, as a trainer would send it
    got = engine.generate(PROMPTS, GREEDY)
    ref = backend.generate(model, PROMPTS, GREEDY)
    assert got.extras == {"engine": "vllm", "weight_version": version, "logprob_basis": "trainer"}
    assert np.array_equal(got.completion_tokens, ref.completion_tokens)
    assert np.array_equal(got.prompt_tokens, ref.prompt_tokens) and np.array_equal(got.lengths, ref.lengths)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)
    # EOS (here: a token the greedy run emits) stops a row and stays in it, as in the native sampler
    eos = int(ref.completion_tokens[1, 5])
    cfg = SamplingConfig(max_new_tokens=16, temperature=0, eos_ids=(eos,), stop_sequences=(tuple(
        int(t) for t in ref.completion_tokens[0, 2:4]),))
    got, ref = engine.generate(PROMPTS, cfg), backend.generate(model, PROMPTS, cfg)
    assert np.array_equal(got.completion_tokens, ref.completion_tokens)
    assert np.array_equal(got.truncated, ref.truncated) and not got.truncated[:2].any()


@pytest.mark.parametrize("name", BACKENDS)
def test_after_grpo_steps_a_sync_puts_vllm_logprobs_on_the_trainers(engine, name):
    """3 GRPO steps move the policy; vLLM's log-probs of its own samples then equal the trainer's within 1e-5 after
    a sync, and are far from them without one (so the sync is what makes them equal)."""
    backend = get_backend(name)
    cfg = GRPOConfig(steps=3, prompts_per_step=4, num_generations=4, max_prompt_length=3, max_completion_length=4,
                     seed=1, beta=0.0, optim=OptimConfig(lr=3e-2))
    state = backend.init_train_state(backend.build(SPEC, SPEC.init_weights(0)), cfg.optim)
    push(engine, backend.export_weights(state))
    for step in range(3):
        state, _ = grpo_step(backend, state, TOK, lowercase, ROWS[:4], cfg, step)
    ids = encode_prompts(TOK, [r["prompt"] for r in ROWS[:4]], cfg.max_prompt_length)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, n=4, eos_ids=())
    stale = engine.generate(ids, sampling, seed=0)
    lp, sampler = trainer_logprobs(backend, state.model, stale, cfg.max_prompt_length, 1.0)
    assert np.abs(lp - sampler).max() > 1e-2
    version = push(engine, backend.export_weights(state))
    fresh = engine.generate(ids, sampling, seed=0)
    assert fresh.extras["weight_version"] == version
    lp, sampler = trainer_logprobs(backend, state.model, fresh, cfg.max_prompt_length, 1.0)
    assert np.abs(lp - sampler).max() <= 1e-5
    tempered = SamplingConfig(max_new_tokens=8, temperature=0.7, n=2, eos_ids=())  # processed = log_softmax(l / T)
    lp, sampler = trainer_logprobs(backend, state.model, engine.generate(ids, tempered, seed=1),
                                   cfg.max_prompt_length, 0.7)
    assert np.abs(lp - sampler).max() <= 1e-5


@pytest.mark.parametrize("name", BACKENDS)
def test_lora_grpo_syncs_only_the_adapters_and_vllm_logprobs_equal_the_trainers(engine, name):
    """A LoRA policy: the engine keeps the base it was given, each push moves only the adapters (a PEFT folder per
    version, vLLM's LoRA path: the CPU build serves it), and after 3 GRPO steps vLLM's log-probs of its own samples
    equal the trainer's within 1e-5; with the previous adapters (no sync) they are far off."""
    backend = get_backend(name)
    lora = LoRAConfig(r=4, alpha=16)
    cfg = GRPOConfig(steps=3, prompts_per_step=4, num_generations=4, max_prompt_length=3, max_completion_length=4,
                     seed=1, beta=0.0, lora=lora, optim=OptimConfig(lr=5e-2))
    model = backend.apply_lora(backend.build(SPEC, SPEC.init_weights(0)), lora, seed=0)
    push(engine, backend.export(model))  # the shared base, once
    state = backend.init_train_state(model, cfg.optim)
    push_weights(engine, backend, state)
    adapter_bytes = float(sum(a.nbytes for a in backend.export_adapters(state.model).values()))
    assert sync_metrics(engine) == {"sync/mode": 1.0, "sync/bytes": adapter_bytes}
    assert adapter_bytes < 0.2 * sum(a.nbytes for a in SPEC.init_weights(0).values())
    for step in range(3):
        state, _ = grpo_step(backend, state, TOK, lowercase, ROWS[:4], cfg, step)
    ids = encode_prompts(TOK, [r["prompt"] for r in ROWS[:4]], cfg.max_prompt_length)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, n=4, eos_ids=())
    lp, sampler = trainer_logprobs(backend, state.model, engine.generate(ids, sampling, seed=0), 3, 1.0)
    assert np.abs(lp - sampler).max() > 1e-2  # the adapters of the start
    version = push_weights(engine, backend, state)
    assert engine.adapter == f"v{version}" and sync_metrics(engine)["sync/mode"] == 1.0
    fresh = engine.generate(ids, sampling, seed=0)
    assert fresh.extras["weight_version"] == version
    lp, sampler = trainer_logprobs(backend, state.model, fresh, 3, 1.0)
    assert np.abs(lp - sampler).max() <= 1e-5
    # the base stayed what it was given: a plain sync of the same merged weights samples the same tokens
    merged = backend.merged_weights(state.model)
    push(engine, merged)
    assert engine.adapter is None
    again = engine.generate(ids, sampling, seed=0)
    assert np.array_equal(again.completion_tokens, fresh.completion_tokens)
    np.testing.assert_allclose(again.logprobs, fresh.logprobs, atol=1e-5)


def _swap_in_flight(engine, weights, recompute_kv: bool, sampling, version=None):
    """generate in this thread while another thread swaps the weights in as soon as the rollout runs; the
    updater's error, if any, is raised here."""
    import threading
    import time

    version = engine.weight_version + 1 if version is None else version
    errors = []

    def update():
        while not engine._generating:
            time.sleep(0.0005)
        try:
            engine.update_weights_in_flight(weights, version, recompute_kv=recompute_kv, timeout_s=60)
        except RolloutEngineError as e:
            errors.append(e)

    thread = threading.Thread(target=update)
    thread.start()
    got = engine.generate(PROMPTS, sampling)
    thread.join(60)
    if errors:
        raise errors[0]
    return got, version


def test_weights_swapped_in_flight_land_between_steps_with_per_token_versions(engine):
    """update_weights_in_flight from another thread: vLLM's step loop pauses, reloads, resumes. Tokens before the
    swap are the old weights' greedy choice, every token records its version, and with recompute_kv the tokens
    after it are exactly the new weights' (their K/V recomputed); keeping the K/V, the prefix still is the old's."""
    backend = get_backend("torch")
    long = SamplingConfig(max_new_tokens=48, temperature=0, eos_ids=())
    for recompute_kv, seeds in ((True, (41, 42)), (False, (43, 44))):
        old, new = (backend.build(SPEC, SPEC.init_weights(s)) for s in seeds)
        v0 = push(engine, backend.export(old))
        got, v1 = _swap_in_flight(engine, backend.export(new), recompute_kv, long)
        assert got.extras["weight_version"] == v0 and engine.weight_version == v1
        versions = got.extras["token_versions"]
        cut = (versions == v0).sum(1)
        assert (cut > 0).all() and (cut < 48).all(), cut  # the swap landed mid-rollout
        assert all((row[:k] == v0).all() and (row[k:] == v1).all() for row, k in zip(versions, cut))
        ref = backend.generate(old, PROMPTS, long)
        for r, k in enumerate(cut):
            assert np.array_equal(got.completion_tokens[r, :k], ref.completion_tokens[r, :k])
            np.testing.assert_allclose(got.logprobs[r, :k], ref.logprobs[r, :k], atol=1e-5)
        if recompute_kv:  # after the swap: the new weights' greedy choice on the full sequence, its log-probs
            width = got.prompt_tokens.shape[1]
            batch = rollout_batch(got, width)
            lp = sequence_logprobs(backend, new, batch["tokens"], batch["attention_mask"], batch["mask"], 1.0)
            logits = backend.to_numpy(backend.forward(new, backend.from_numpy(batch["tokens"]),
                                                      backend.from_numpy(batch["attention_mask"])))
            for r, k in enumerate(cut):
                pos = np.arange(width - 1 + k, width - 1 + 48)
                np.testing.assert_allclose(got.logprobs[r, k:], lp[r, pos], atol=1e-5)
                assert np.array_equal(logits[r, pos].argmax(-1), got.completion_tokens[r, k:])
        after = engine.generate(PROMPTS, long)  # a complete sync: the next rollout is the new weights' alone
        assert "token_versions" not in after.extras
        assert np.array_equal(after.completion_tokens, backend.generate(new, PROMPTS, long).completion_tokens)
    with pytest.raises(RolloutEngineError, match="older than the engine's"):
        _swap_in_flight(engine, SPEC.init_weights(0), False, long, version=engine.weight_version - 1)


def test_a_sync_resets_the_prefix_cache(engine):
    """A 40-token prompt fills a cached KV block; after a sync it must be recomputed with the new weights."""
    backend = get_backend("torch")
    long_prompts = [[1, *range(10, 49)], [1, *range(10, 49)]]
    cfg = SamplingConfig(max_new_tokens=8, temperature=0, eos_ids=())
    push(engine, SPEC.init_weights(21))
    engine.generate(long_prompts, cfg)  # caches the shared 32-token prefix under the old weights
    model = backend.build(SPEC, SPEC.init_weights(22))
    push(engine, backend.export(model))
    got, ref = engine.generate(long_prompts, cfg), backend.generate(model, long_prompts, cfg)
    assert np.array_equal(got.completion_tokens, ref.completion_tokens)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)


def test_closing_a_second_engine_leaves_the_first_working(engine):
    """In-process engines share vLLM's global parallel groups; closing one must not tear them down under another."""
    backend = get_backend("torch")
    model = backend.build(SPEC, SPEC.init_weights(31))
    push(engine, backend.export(model))
    second = VLLMEngine(SPEC, SPEC.init_weights(32), max_model_len=MAX_LEN)
    other = backend.generate(backend.build(SPEC, SPEC.init_weights(32)), PROMPTS, GREEDY)
    assert np.array_equal(second.generate(PROMPTS, GREEDY).completion_tokens, other.completion_tokens)
    second.close()
    assert np.array_equal(engine.generate(PROMPTS, GREEDY).completion_tokens,
                          backend.generate(model, PROMPTS, GREEDY).completion_tokens)


def test_server_mode_on_loopback_with_raw_logprobs():
    """Start, generate, sync, version check, shutdown; a top-p run gets the raw (full-vocabulary) basis, which at
    T = 1 is the trainer's."""
    from diptych.rollout.server import ServerEngine

    torch_b = get_backend("torch")
    w0, w1 = SPEC.init_weights(3), SPEC.init_weights(4)
    topp = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.8, n=2, eos_ids=())
    lora = LoRAConfig(r=4, alpha=16, targets=("q_proj", "down_proj"))
    server = ServerEngine.start(SPEC, w0, sampling=topp, config=VLLMConfig(mode="server"), max_model_len=MAX_LEN,
                                lora=lora)  # LoRA slots, no adapter yet
    try:
        health = server.health()
        assert health["logprobs_mode"] == "raw" and health["weight_version"] == 0
        got = server.generate(PROMPTS, GREEDY)
        assert np.array_equal(got.completion_tokens, torch_b.generate(torch_b.build(SPEC, w0), PROMPTS,
                                                                      GREEDY).completion_tokens)
        server.sync_weights(w1, 5)
        model1 = torch_b.build(SPEC, w1)
        got = server.generate(PROMPTS, topp, seed=0)
        assert got.extras["weight_version"] == 5 and got.extras["logprob_basis"] == "trainer"
        lp, sampler = trainer_logprobs(torch_b, model1, got, 8, 1.0)
        assert np.abs(lp - sampler).max() <= 1e-5
        stale = ServerEngine(server.url, version=4)
        with pytest.raises(RolloutEngineError, match=r"HTTP 409.*expects 4, the server holds 5"):
            stale.generate(PROMPTS, GREEDY)
        with pytest.raises(RolloutEngineError, match="older than the engine's 5"):
            server.sync_weights(w0, 3)
        # the collective channel (gloo here, NCCL between GPUs): the same weights give the same samples
        server.sync_weights(w0, 6)
        assert not np.array_equal(server.generate(PROMPTS, topp, seed=0).logprobs, got.logprobs)  # w0 now
        coll = ServerEngine(server.url, version=6, timeout_s=120)
        assert coll.open_collective() == "gloo" and coll.health()["collective"] == "ready"
        coll.sync_weights(w1, 7)
        again = coll.generate(PROMPTS, topp, seed=0)
        assert again.extras["weight_version"] == 7 and coll.last_sync["channel"] == "collective"
        assert np.array_equal(again.completion_tokens, got.completion_tokens)
        np.testing.assert_allclose(again.logprobs, got.logprobs, atol=1e-6)
        coll._version = 5  # a trainer that missed a sync is refused before any tensor moves
        with pytest.raises(RolloutEngineError, match=r"HTTP 400.*older than the engine's 7"):
            coll.sync_weights(w1, 6)
        server._version = 7  # the HTTP client follows: both channels feed one server
        coll.close()
        # a LoRA policy's adapters alone, over POST /adapters, on the server's shared base (w1 now)
        from diptych.core.lora import init_adapters, merge_weights

        shapes = {k[: -len(".weight")]: v.shape for k, v in w1.items()
                  if k.endswith(("q_proj.weight", "down_proj.weight"))}
        adapters = {k: (v + 0.3 if "lora_B" in k else v) for k, v in init_adapters(shapes, lora, seed=2).items()}
        assert server.serves_lora and server.max_lora_rank == 8
        server.sync_adapters(adapters, lora, 8)
        merged = torch_b.build(SPEC, merge_weights(w1, adapters, lora))
        got = server.generate(PROMPTS, GREEDY)
        ref = torch_b.generate(merged, PROMPTS, GREEDY)
        assert got.extras["weight_version"] == 8 and server.last_sync["mode"] == "adapters"
        assert np.array_equal(got.completion_tokens, ref.completion_tokens)
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)
    finally:
        server.close()
    assert server.process.returncode == 0  # a clean shutdown, not a kill
    with pytest.raises(RolloutEngineError, match="closed"):
        server.generate(PROMPTS, GREEDY)


def test_bad_input_is_refused_clearly(engine):
    with pytest.raises(RolloutEngineError, match="processed log-probs, which renormalise"):
        engine.generate(PROMPTS, SamplingConfig(temperature=1.0, top_k=5))
    with pytest.raises(SamplingError, match="max_model_len"):
        engine.generate(PROMPTS, SamplingConfig(max_new_tokens=60, temperature=0))
    with pytest.raises(SamplingError, match="outside the vocabulary"):
        engine.generate([[SPEC.vocab_size]], GREEDY)
    version = push(engine, SPEC.init_weights(0))
    with pytest.raises(RolloutEngineError, match=f"older than the engine's {version}"):
        engine.sync_weights(SPEC.init_weights(0), version - 1)
    with pytest.raises(RolloutEngineError, match="missing"):
        engine.sync_weights({"model.norm.weight": np.ones(SPEC.hidden_size, np.float32)}, engine.weight_version + 1)
    with pytest.raises(RolloutEngineError, match="no kernel for head_dim=16"):
        VLLMEngine(tiny_spec("llama"), tiny_spec("llama").init_weights(0))
    rec = tiny_recurrent_spec()
    with pytest.raises(RolloutEngineError, match="recurrent-depth"):
        VLLMEngine(rec, rec.init_weights(0))


@pytest.mark.parametrize("name", [pytest.param("jax", marks=[needs_jax, pytest.mark.slow]),  # ~45 s loaded, compiles
                                  pytest.param("torch", marks=needs_torch)])
def test_short_grpo_run_with_vllm_rollouts_raises_a_dense_reward(engine, name):
    """12 steps, sampled by vLLM and synced after every update: the lowercase share rises as in the native run
    (torch native, same settings: 0.2 -> 1.0), every step samples with the previous step's weights, and the
    sampler/trainer log-prob gap stays at float noise (the loop's syncs are real)."""
    from diptych.core.metrics import MetricsLogger

    backend = get_backend(name)
    cfg = GRPOConfig(steps=12, prompts_per_step=4, num_generations=4, max_prompt_length=3, max_completion_length=4,
                     seed=1, beta=0.0, rollout="vllm", optim=OptimConfig(lr=2e-2))
    state = backend.init_train_state(backend.build(SPEC, SPEC.init_weights(0)), cfg.optim)
    log, v0 = MetricsLogger(), engine.weight_version
    train_grpo(backend, state, TOK, lowercase, ROWS, cfg, log, engine=engine)
    rewards = [h["reward"] for h in log.history]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.3, rewards
    assert [h["weight_version"] for h in log.history] == list(range(v0 + 1, v0 + 13))
    assert max(h["sampler_logprob_gap"] for h in log.history) <= 1e-4
    assert all(h["time/sync"] > 0 for h in log.history)


def test_ppo_samples_through_the_engine(engine):
    from diptych.core.metrics import MetricsLogger
    from diptych.core.trainers.ppo import PPOConfig, train_ppo

    backend = get_backend("torch")
    cfg = PPOConfig(steps=3, prompts_per_step=2, num_generations=2, num_ppo_epochs=1, max_prompt_length=3,
                    max_completion_length=4, kl_coef=0.0, seed=1, rollout="vllm", optim=OptimConfig(lr=2e-2))
    state = backend.init_train_state(backend.build(SPEC, SPEC.init_weights(0)), cfg.optim, value_head=True)
    log, v0 = MetricsLogger(), engine.weight_version
    train_ppo(backend, state, TOK, lowercase, ROWS, cfg, log, engine=engine)
    assert [h["weight_version"] for h in log.history] == [v0 + 1, v0 + 2, v0 + 3]
    assert max(h["sampler_logprob_gap"] for h in log.history) <= 1e-4


@pytest.mark.slow  # a second server process: ~20 s quiet, ~100 s on a loaded machine
def test_server_dying_mid_run_is_a_clear_error_and_the_last_checkpoint_survives(tmp_path):
    from diptych.core.trainers.api import GRPOTrainer
    from diptych.core.trainers.runner import CheckpointConfig, Checkpointer

    backend = get_backend("torch")
    calls: list[int] = []

    def reward_that_kills_the_server(prompts, completions, **columns):
        calls.append(1)
        if len(calls) == 3:  # step 3, after its rollout: the server dies before the post-update sync
            trainer.engine.process.kill()
        return lowercase(prompts, completions)

    args = GRPOConfig(steps=5, prompts_per_step=2, num_generations=2, max_prompt_length=3, max_completion_length=4,
                      seed=1, beta=0.0, rollout="vllm", vllm=VLLMConfig(mode="server"), optim=OptimConfig(lr=2e-2))
    trainer = GRPOTrainer(backend.build(SPEC, SPEC.init_weights(0)), reward_that_kills_the_server, args=args,
                          train_dataset=ROWS, backend=backend, tokenizer=TOK, out_dir=tmp_path,
                          checkpoint=CheckpointConfig(every=1))
    with pytest.raises(RolloutEngineError, match=r"stopped answering POST /weights.*exited with status -9"):
        trainer.train()
    assert trainer.engine.closed
    restored = Checkpointer(backend, tmp_path / "checkpoints", trainer.run_config).restore_latest()
    assert restored is not None and restored[1]["step"] == 2


def test_diptych_sample_with_the_vllm_engine_prints_the_native_greedy_text(tmp_path, capsys):
    import json

    from diptych.cli import main
    from diptych.core.hf import save_hf_folder
    from diptych.core.tokenizer import save_tokenizer

    folder = save_hf_folder(tmp_path / "model", SPEC, SPEC.init_weights(5))
    save_tokenizer(TOK, folder)
    out = {}
    for engine in ("native", "vllm"):
        assert main(["sample", "--backend", "torch", "--checkpoint", str(folder), "--engine", engine,
                     "--temperature", "0", "--max-new-tokens", "12", "--prompt", "ab", "--prompt", "xyz",
                     "--json"]) == 0
        out[engine] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(out["vllm"]) == 2 and [r["tokens"] for r in out["vllm"]] == [r["tokens"] for r in out["native"]]
    assert main(["sample", "--backend", "torch", "--engine", "vllm", "--prompt", "ab"]) == 2  # tiny model: head_dim 16
    assert "no kernel for head_dim=16" in capsys.readouterr().err
