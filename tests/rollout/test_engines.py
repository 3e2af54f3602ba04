"""The rollout-engine seam without vLLM: the protocol, the native engine, the checks, the refusals, and
the rollout server's HTTP wire (a native engine behind it), so the main environment covers everything
but vLLM itself (tests/rollout/test_vllm.py needs the vLLM venv: scripts/vllm_env.sh)."""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from diptych.core.recurrent_spec import tiny_recurrent_spec
from diptych.core.sampling import SamplingConfig
from diptych.core.spec import tiny_spec
from diptych.rollout import NativeEngine, RolloutEngine, RolloutEngineError, VLLMConfig, make_engine
from diptych.rollout.base import (
    check_version,
    logprob_basis,
    resolve_logprobs_mode,
    sampling_from_dict,
    sampling_to_dict,
    weight_items,
)
from diptych.rollout.server import ServerEngine, rollout_from_json, rollout_to_json, serve

pytest.importorskip("torch")

SPEC = tiny_spec("llama", num_attention_heads=2, num_key_value_heads=1, eos_token_id=1, pad_token_id=0)  # head_dim 32
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13]]
GREEDY = SamplingConfig(max_new_tokens=6, temperature=0, eos_ids=())


@pytest.fixture(scope="module")
def torch_backend():
    from diptych.core.backend import get_backend

    return get_backend("torch")


def test_native_engine_is_the_backend_sampler_and_sync_rebuilds_it(torch_backend):
    b = torch_backend
    w0, w1 = SPEC.init_weights(0), SPEC.init_weights(1)
    eng = NativeEngine(b, b.build(SPEC, w0))
    assert isinstance(eng, RolloutEngine) and eng.weight_version == 0
    r = eng.generate(PROMPTS, GREEDY)
    ref0 = b.generate(b.build(SPEC, w0), PROMPTS, GREEDY)
    ref1 = b.generate(b.build(SPEC, w1), PROMPTS, GREEDY)
    assert (r.completion_tokens == ref0.completion_tokens).all()
    assert r.extras == {"engine": "native", "weight_version": 0, "logprob_basis": "trainer"}
    assert not (ref0.completion_tokens == ref1.completion_tokens).all()  # the sync below is observable
    eng.sync_weights(iter(w1.items()), 4)  # an iterator of pairs, as a streaming exporter gives
    r = eng.generate(PROMPTS, GREEDY)
    assert (r.completion_tokens == ref1.completion_tokens).all() and r.extras["weight_version"] == 4
    seeded = SamplingConfig(max_new_tokens=6, temperature=1.0, n=2, eos_ids=())
    a, c = eng.generate(PROMPTS, seeded, seed=7), eng.generate(PROMPTS, seeded, seed=7)
    assert (a.completion_tokens == c.completion_tokens).all()
    eng.close()
    with pytest.raises(RolloutEngineError, match="closed"):
        eng.generate(PROMPTS, GREEDY)


def test_versions_only_go_up_and_weights_are_checked():
    assert check_version(3, 3) == 3 and check_version(np.int64(5), 3) == 5
    with pytest.raises(RolloutEngineError, match="older than the engine's 3"):
        check_version(2, 3)
    with pytest.raises(RolloutEngineError, match="must be an int"):
        check_version("4", 0)
    with pytest.raises(RolloutEngineError, match="must be an int"):
        check_version(True, 0)
    w = dict(weight_items({"a": np.ones((2, 2), np.float64)}))
    assert w["a"].dtype == np.float32
    with pytest.raises(RolloutEngineError, match="dtype int64"):
        list(weight_items({"a": np.ones(2, np.int64)}))
    with pytest.raises(RolloutEngineError, match=r"\(hf_name, array\) pairs"):
        list(weight_items([np.ones(2)]))
    with pytest.raises(RolloutEngineError, match="needs weights"):
        list(weight_items(None))


def test_logprob_mode_follows_the_filters():
    plain = SamplingConfig(temperature=0.7)
    topp = SamplingConfig(temperature=1.0, top_p=0.9)
    assert resolve_logprobs_mode("auto", plain) == "processed"
    assert resolve_logprobs_mode("auto", topp) == "raw"
    assert resolve_logprobs_mode("auto", SamplingConfig(temperature=0, top_k=5)) == "processed"  # greedy: none
    assert resolve_logprobs_mode("raw", plain) == "raw"
    assert logprob_basis("processed", plain) == "trainer"
    assert logprob_basis("raw", topp) == "trainer"  # T = 1: the raw basis is the trainer's
    assert logprob_basis("raw", SamplingConfig(temperature=0.7, top_p=0.9)) == "raw"


def test_vllm_config_refuses_bad_settings():
    for kw, msg in [({"mode": "remote"}, "vllm.mode"), ({"logprobs": "exact"}, "vllm.logprobs"),
                    ({"kv_cache_memory_bytes": 1000}, "at least 1 MiB"),
                    ({"kv_cache_memory_bytes": None, "gpu_memory_utilization": 1.5}, r"\(0, 1\]"),
                    ({"kv_cache_memory_bytes": None}, "needs a memory bound"),
                    ({"url": "127.0.0.1:8011", "mode": "server"}, "http://"),
                    ({"url": "http://127.0.0.1:8011"}, "for server mode")]:
        with pytest.raises(RolloutEngineError, match=msg):
            VLLMConfig(**kw)


def test_refusals_before_vllm_is_touched(torch_backend, monkeypatch):
    b = torch_backend
    with pytest.raises(RolloutEngineError, match="native, vllm"):
        make_engine("sglang", b, None)
    rec = tiny_recurrent_spec()
    with pytest.raises(RolloutEngineError, match="recurrent-depth"):
        make_engine("vllm", b, b.build(rec, rec.init_weights(0)))
    model = b.build(SPEC, SPEC.init_weights(0))
    with pytest.raises(RolloutEngineError, match="parity noise, depth"):
        make_engine("vllm", b, model, noise=np.zeros(1))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(RolloutEngineError, match=r"not installed; install it with pip install 'diptych\[vllm\]'"):
        make_engine("vllm", b, model)


def test_sampling_and_rollout_survive_the_wire(torch_backend):
    s = SamplingConfig(max_new_tokens=5, temperature=0.5, top_k=3, n=2, eos_ids=(1, 2), stop_sequences=((4, 5),))
    assert sampling_from_dict(sampling_to_dict(s)) == s
    with pytest.raises(RolloutEngineError, match="unknown sampling field"):
        sampling_from_dict({"beam_width": 4})
    b = torch_backend
    r = b.generate(b.build(SPEC, SPEC.init_weights(0)), PROMPTS, SamplingConfig(max_new_tokens=4, n=2), seed=0)
    r.extras["weight_version"] = 2
    back = rollout_from_json(rollout_to_json(r))
    for k in ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask", "logprobs", "lengths",
              "truncated"):
        assert np.array_equal(getattr(back, k), getattr(r, k)) and getattr(back, k).dtype == getattr(r, k).dtype, k
    assert back.extras["weight_version"] == 2


class _ServedNative(NativeEngine):
    """A native engine with the attributes the server reports, standing in for vLLM behind the HTTP API."""

    mode, max_model_len = "processed", 512

    @property
    def spec(self):
        return self.model.spec


def test_server_protocol_generate_sync_version_check_shutdown(torch_backend, tmp_path):
    b = torch_backend
    w0, w1 = SPEC.init_weights(0), SPEC.init_weights(1)
    port_file = tmp_path / "url"
    thread = threading.Thread(target=serve, args=(_ServedNative(b, b.build(SPEC, w0)), "127.0.0.1", 0, port_file),
                              kwargs={"log": lambda m: None}, daemon=True)
    thread.start()
    for _ in range(200):
        if port_file.is_file():
            break
        thread.join(0.05)
    client = ServerEngine(port_file.read_text().strip(), timeout_s=60)
    assert client.health()["weight_version"] == 0
    r = client.generate(PROMPTS, GREEDY)
    assert (r.completion_tokens == b.generate(b.build(SPEC, w0), PROMPTS, GREEDY).completion_tokens).all()
    client.sync_weights(w1, 3)
    r = client.generate(PROMPTS, GREEDY)
    assert r.extras["weight_version"] == 3 and client.health()["weight_version"] == 3
    assert (r.completion_tokens == b.generate(b.build(SPEC, w1), PROMPTS, GREEDY).completion_tokens).all()
    stale = ServerEngine(client.url, version=2, timeout_s=60)  # a trainer that missed a sync
    with pytest.raises(RolloutEngineError, match=r"HTTP 409.*expects 2, the server holds 3"):
        stale.generate(PROMPTS, GREEDY)
    with pytest.raises(RolloutEngineError, match=r"HTTP 400.*outside the vocabulary"):
        client.generate([[SPEC.vocab_size + 5]], GREEDY)
    # a trainer joining this running server (vllm.url) adopts its version and pushes its weights as the next one
    joined = ServerEngine.start(SPEC, w0, config=VLLMConfig(mode="server", url=client.url))
    assert joined.weight_version == 4 and joined.process is None
    assert (joined.generate(PROMPTS, GREEDY).completion_tokens
            == b.generate(b.build(SPEC, w0), PROMPTS, GREEDY).completion_tokens).all()
    with pytest.raises(RolloutEngineError, match="returns processed log-probs but this run needs raw"):
        ServerEngine.start(SPEC, w0, sampling=SamplingConfig(top_p=0.5), config=VLLMConfig(mode="server",
                                                                                           url=client.url))
    joined.close()  # a server it did not start keeps running
    assert client.health()["weight_version"] == 4
    client.shutdown()
    thread.join(10)
    assert not thread.is_alive()
    with pytest.raises(RolloutEngineError, match=r"stopped answering POST /generate.*resume from the last checkpoint"):
        client.generate(PROMPTS, GREEDY)


def test_trainer_helpers_check_config_versions_and_sleep(torch_backend):
    from diptych.core.optim import OptimConfig
    from diptych.rollout.base import check_rollout_config, push_weights, sample_with

    assert check_rollout_config("vllm", {"mode": "server"}).mode == "server"
    with pytest.raises(RolloutEngineError, match="native, vllm"):
        check_rollout_config("tgi", None)
    with pytest.raises(RolloutEngineError, match="parity: true needs the native sampler"):
        check_rollout_config("vllm", None, parity=True)
    with pytest.raises(RolloutEngineError, match="recurrent-depth"):
        check_rollout_config("vllm", None, depth=object())
    assert check_rollout_config("native", None, parity=True).mode == "colocated"  # native honours both

    b = torch_backend
    state = b.init_train_state(b.build(SPEC, SPEC.init_weights(0)), OptimConfig(lr=1e-2))
    slept = []

    class Sleepy(NativeEngine):
        def sleep(self):
            slept.append(self.weight_version)

    eng = Sleepy(b, b.build(SPEC, SPEC.init_weights(1)), version=2)
    assert push_weights(eng, b, state) == 3 and eng.weight_version == 3
    r = sample_with(eng, PROMPTS, GREEDY, seed=0)
    assert slept == [3] and r.extras["weight_version"] == 3
    assert (r.completion_tokens == b.generate(state.model, PROMPTS, GREEDY).completion_tokens).all()  # the state's

    class Stale(NativeEngine):
        def generate(self, *a, **k):
            r = super().generate(*a, **k)
            r.extras["weight_version"] -= 1  # an engine that did not load the last sync
            return r

    with pytest.raises(RolloutEngineError, match="sampled with weight version 2, but the trainer pushed 3"):
        sample_with(Stale(b, state.model, version=3), PROMPTS, GREEDY, seed=0)


def test_rollout_server_command_refuses_bad_input_in_one_line(tmp_path, capsys):
    from diptych.commands.rollout_server import main
    from diptych.core.hf import save_hf_folder

    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    rec = tiny_recurrent_spec()
    folder = save_hf_folder(tmp_path / "huginn", rec, rec.init_weights(0))
    if importlib.util.find_spec("vllm") is None:
        assert main(["--model", str(folder)]) == 2
        assert "not installed; install it with pip install 'diptych[vllm]'" in capsys.readouterr().err
    else:
        assert main(["--model", str(folder)]) == 2
        assert "recurrent-depth" in capsys.readouterr().err


# -- the collective weight channel (server mode), over gloo on this CPU -------------------------------------------
def _serve_native(b, weights, tmp_path):
    port_file = tmp_path / "url"
    thread = threading.Thread(target=serve, args=(_ServedNative(b, b.build(SPEC, weights)), "127.0.0.1", 0,
                                                  port_file), kwargs={"log": lambda m: None}, daemon=True)
    thread.start()
    for _ in range(200):
        if port_file.is_file():
            break
        thread.join(0.05)
    return thread, port_file.read_text().strip()


def test_collective_channel_syncs_what_the_http_channel_syncs(torch_backend, tmp_path):
    """Two clients of one server, one per channel: a broadcast sync (several buckets) samples exactly what a
    safetensors sync of the same weights does, a stale or malformed sync is refused before any tensor moves (so
    nothing hangs), and the channel keeps working after a refusal."""
    from diptych.rollout.collective import plan_buckets

    b = torch_backend
    w0, w1, w2 = SPEC.init_weights(0), SPEC.init_weights(1), SPEC.init_weights(2)
    thread, url = _serve_native(b, w0, tmp_path)
    http = ServerEngine(url, timeout_s=60)
    coll = ServerEngine(url, timeout_s=60)
    assert coll.open_collective() == "gloo" and coll.channel == "collective"
    coll.bucket_bytes = 40_000  # the tiny model's 360 kB in many buckets, some tensors alone
    assert coll.health()["collective"] == "ready"
    ref1 = b.generate(b.build(SPEC, w1), PROMPTS, GREEDY)
    assert not (http.generate(PROMPTS, GREEDY).completion_tokens == ref1.completion_tokens).all()  # w0 still
    coll.sync_weights(w1, 1)
    got = coll.generate(PROMPTS, GREEDY)
    assert got.extras["weight_version"] == 1 and coll.last_sync["channel"] == "collective"
    assert (got.completion_tokens == ref1.completion_tokens).all()
    np.testing.assert_array_equal(got.logprobs, ref1.logprobs)  # the same weights, bit for bit
    http._version = 1
    http.sync_weights(w2, 2)
    by_http = http.generate(PROMPTS, GREEDY)
    coll._version = 2
    coll.sync_weights(w2, 3)
    by_coll = coll.generate(PROMPTS, GREEDY)
    np.testing.assert_array_equal(by_coll.logprobs, by_http.logprobs)
    assert (by_coll.completion_tokens == by_http.completion_tokens).all()
    coll._version = 1  # a trainer that missed syncs: refused by the server, before the broadcast
    with pytest.raises(RolloutEngineError, match=r"HTTP 400.*older than the engine's 3"):
        coll.sync_weights(w1, 2)
    coll._version = 3
    with pytest.raises(RolloutEngineError, match=r"HTTP 400.*missing \['model.embed_tokens.weight'\]"):
        coll.sync_weights({k: v for k, v in w1.items() if k != "model.embed_tokens.weight"}, 4)
    with pytest.raises(RolloutEngineError, match=r"HTTP 400.*has shape"):
        coll.sync_weights({**w1, "model.norm.weight": np.ones(3, np.float32)}, 4)
    coll.sync_weights(w1, 4)  # the channel survived the refusals
    assert (coll.generate(PROMPTS, GREEDY).completion_tokens == ref1.completion_tokens).all()
    man = [{"name": "a", "shape": [10_000], "dtype": "float32"}, {"name": "b", "shape": [2, 2], "dtype": "float32"},
           {"name": "c", "shape": [3], "dtype": "float32"}, {"name": "d", "shape": [20_000], "dtype": "float32"}]
    assert plan_buckets(man, 40_016) == [[0, 1], [2], [3]] and plan_buckets(man) == [[0, 1, 2, 3]]
    # a server that cannot reach the trainer's store says so, and refuses collective syncs in one line
    body = json.dumps({"host": "127.0.0.1", "port": 1, "backend": "gloo", "timeout_s": 1}).encode()
    http._request("POST", "/collective/init", body, {"Content-Type": "application/json"})
    for _ in range(300):
        if http.health()["collective"].startswith("failed"):
            break
        thread.join(0.1)
    assert http.health()["collective"].startswith("failed")
    with pytest.raises(RolloutEngineError, match=r"HTTP 400.*collective weight channel is not open \(failed"):
        coll.sync_weights(w1, 5)
    coll.close()
    http.shutdown()
    thread.join(10)
    assert not thread.is_alive()


def test_weight_channel_and_sleep_settings_are_checked(monkeypatch):
    import diptych.rollout.collective as coll
    from diptych.rollout.vllm_engine import lora_rank, sleep_enabled

    monkeypatch.setattr(coll, "cuda_uuid", lambda: "GPU-0")  # NCCL only between two different GPUs
    assert coll.choose_backend("cuda", "GPU-1") == "nccl" and coll.choose_backend("cuda", "GPU-0") == "gloo"
    assert coll.choose_backend("cpu") == "gloo"
    monkeypatch.setattr(coll, "cuda_uuid", lambda: None)  # a trainer without CUDA
    assert coll.choose_backend("cuda", "GPU-1") == "gloo"

    assert VLLMConfig(sleep=True).sleep == "on" and VLLMConfig(sleep=False).sleep == "off"  # YAML's bare on / off
    assert VLLMConfig(mode="server", weight_channel="collective").weight_channel == "collective"
    for kw, msg in [({"sleep": "sometimes"}, "vllm.sleep"), ({"weight_channel": "nccl"}, "vllm.weight_channel"),
                    ({"weight_channel": "collective"}, "is for server mode"), ({"lora_sync": "both"}, "lora_sync")]:
        with pytest.raises(RolloutEngineError, match=msg):
            VLLMConfig(**kw)
    assert sleep_enabled("auto", True) and not sleep_enabled("auto", False) and not sleep_enabled("off", True)
    with pytest.raises(RolloutEngineError, match="needs a CUDA GPU"):
        sleep_enabled("on", False)
    assert [lora_rank(r) for r in (1, 2, 8, 9, 512)] == [1, 8, 8, 16, 512]
    with pytest.raises(RolloutEngineError, match="up to 512"):
        lora_rank(513)


class _FakeLLM:
    """vllm.LLM's surface that VLLMEngine uses, recording the calls; generate answers greedy-like rows."""

    def __init__(self, log, **kw):
        self.log = log
        log.append(("LLM", "enable_sleep_mode" in kw, kw.get("enable_lora", False)))

    def enqueue(self, requests, params, use_tqdm=False, lora_request=None):
        from types import SimpleNamespace

        self.log.append(("generate", None if lora_request is None else lora_request.lora_name))
        step = SimpleNamespace(logprob=-0.5)
        self.queue = [SimpleNamespace(request_id=str(i), finished=True, outputs=[SimpleNamespace(
            token_ids=[7] * p.max_tokens, finish_reason="length", logprobs=[{7: step}] * p.max_tokens)])
            for i, p in enumerate(params)]
        self.llm_engine = SimpleNamespace(has_unfinished_requests=lambda: bool(self.queue), step=self._step)
        return [str(i) for i in range(len(params))]

    def _step(self):
        out, self.queue = self.queue[::-1], []  # finished out of order, as vLLM may
        return out

    def collective_rpc(self, method, kwargs=None):
        self.log.append((method,))

    def reset_prefix_cache(self):
        self.log.append(("reset_prefix_cache",))

    def sleep(self, level=1):
        self.log.append(("sleep", level))

    def wake_up(self, tags=None):
        self.log.append(("wake_up",))


def _fake_vllm(monkeypatch, log, cuda: bool):
    """A stand-in vllm module (no vLLM needed): GPU behaviour that cannot run on this machine, checked by call order."""
    import sys
    from types import ModuleType, SimpleNamespace

    import diptych.rollout.vllm_engine as ve

    fake = ModuleType("vllm")
    fake.LLM = lambda **kw: _FakeLLM(log, **kw)
    fake.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    inputs = ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda **kw: SimpleNamespace(**kw)
    request = ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, int_id, path: SimpleNamespace(lora_name=name, lora_int_id=int_id,
                                                                     lora_path=path)
    for name, mod in [("vllm", fake), ("vllm.inputs", inputs), ("vllm.lora", ModuleType("vllm.lora")),
                      ("vllm.lora.request", request)]:
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(ve, "require_vllm", lambda: fake)
    monkeypatch.setattr(ve, "_has_cuda", lambda: cuda)
    monkeypatch.setattr(ve, "cpu_head_sizes", lambda: [32])
    return ve


@pytest.mark.parametrize("cuda", [True, False])
def test_sleep_mode_sleeps_through_the_train_phase_on_gpu_only(torch_backend, monkeypatch, cuda):
    """GPU-unverified here (no CUDA vLLM): with a stand-in LLM, auto sleep on CUDA starts the engine with
    enable_sleep_mode, sleeps (level 1) after each rollout and wakes before the next sync; on CPU it never does."""
    from diptych.core.optim import OptimConfig
    from diptych.rollout.base import push_weights, sample_with

    log: list = []
    ve = _fake_vllm(monkeypatch, log, cuda)
    b = torch_backend
    state = b.init_train_state(b.build(SPEC, SPEC.init_weights(0)), OptimConfig(lr=1e-2))
    eng = ve.VLLMEngine(SPEC, SPEC.init_weights(0), config=VLLMConfig(sleep="auto"))
    try:
        for _ in range(2):
            push_weights(eng, b, state)
            r = sample_with(eng, PROMPTS, GREEDY, seed=0)
            assert r.extras["weight_version"] == eng.weight_version
    finally:
        eng.close()
    cycle = [("reload_weights",), ("reset_prefix_cache",), ("generate", None)]
    if cuda:
        assert log == [("LLM", True, False), *cycle, ("sleep", 1), ("wake_up",), *cycle, ("sleep", 1)]
    else:
        assert log == [("LLM", False, False), *cycle, *cycle]


def test_a_lora_policy_pushes_only_its_adapters_to_an_engine_that_serves_lora(torch_backend, monkeypatch, tmp_path):
    """push_weights is engine-agnostic: adapters (a PEFT folder per version, named by the next generate) to a
    LoRA-serving engine, merged weights to any other, full weights for a plain policy; sync/mode says which."""
    from diptych.core.lora import LoRAConfig, init_adapters, merge_weights
    from diptych.core.optim import OptimConfig
    from diptych.rollout.base import push_weights, sync_metrics

    b = torch_backend
    state = b.init_train_state(b.build(SPEC, SPEC.init_weights(0)), OptimConfig(lr=1e-2))
    lora = LoRAConfig(r=4, alpha=8, targets=("q_proj", "v_proj"))
    w = SPEC.init_weights(0)
    shapes = {k[: -len(".weight")]: v.shape for k, v in w.items() if k.endswith(("q_proj.weight", "v_proj.weight"))}
    adapters = init_adapters(shapes, lora, seed=3)

    class LoRABackend:  # the torch backend, its policy seen as a LoRA model (the adapters fixed)
        def __getattr__(self, name):
            return getattr(b, name)

        def lora_config(self, model):
            return lora

        def export_adapters(self, model):
            return adapters

        def merged_weights(self, model):
            return merge_weights(b.export(model), adapters, lora)

    log: list = []
    ve = _fake_vllm(monkeypatch, log, cuda=False)
    eng = ve.VLLMEngine(SPEC, w, lora=lora)
    try:
        assert eng.serves_lora and eng.max_lora_rank == 8 and log[0] == ("LLM", False, True)
        assert push_weights(eng, LoRABackend(), state) == 1
        assert sync_metrics(eng) == {"sync/mode": 1.0, "sync/bytes": float(sum(a.nbytes for a in adapters.values()))}
        folder = Path(eng._lora_request.lora_path)
        assert folder.name == "v1" and (folder / "adapter_model.safetensors").is_file()
        assert eng._lora_request.lora_int_id == 2 and eng.adapter == "v1"
        eng.generate(PROMPTS, GREEDY)
        push_weights(eng, LoRABackend(), state)
        assert not folder.exists() and eng.adapter == "v2"  # the old version's folder is gone
        eng.generate(PROMPTS, GREEDY)
        assert [e for e in log if e[0] == "generate"] == [("generate", "v1"), ("generate", "v2")]
        push_weights(eng, b, state)  # a plain policy: full weights, the adapter dropped
        assert sync_metrics(eng)["sync/mode"] == 0.0 and eng.adapter is None
        eng.generate(PROMPTS, GREEDY)
        assert log[-1] == ("generate", None)
        with pytest.raises(RolloutEngineError, match="exceed this engine's max_lora_rank 8"):
            eng.sync_adapters(adapters, LoRAConfig(r=16), eng.weight_version + 1)
    finally:
        eng.close()
    # make_engine starts a LoRA model's engine on the base with its adapters, or on merged weights if asked
    log.clear()
    eng = make_engine("vllm", LoRABackend(), state.model, vllm={"lora_sync": "auto"})
    try:
        assert log == [("LLM", False, True)] and eng.serves_lora and eng.adapter == "v0"
    finally:
        eng.close()
    log.clear()
    eng = make_engine("vllm", LoRABackend(), state.model, vllm={"lora_sync": "merged"})
    try:
        assert log == [("LLM", False, False)] and not eng.serves_lora and eng.adapter is None
    finally:
        eng.close()
    plain = NativeEngine(b, state.model)  # an engine without LoRA gets the merged weights
    push_weights(plain, LoRABackend(), state)
    assert sync_metrics(plain) == {"sync/mode": 2.0}
    assert sync_metrics(NativeEngine(b, state.model)) == {}


class _ServedLoRANative(_ServedNative):
    """A native engine with LoRA slots: it serves adapters by merging them into the base it holds (the oracle)."""

    max_lora_rank, serves_lora, adapter = 8, True, None

    def __init__(self, backend, model, **kw):
        super().__init__(backend, model, **kw)
        self.base = backend.export(model)

    def sync_weights(self, weights, version):
        super().sync_weights(weights, version)
        self.base, self.adapter = self.backend.export(self.model), None

    def sync_adapters(self, adapters, lora, version):
        from diptych.core.lora import merge_weights

        version = check_version(version, self._version)
        self.model = self.backend.build(self.spec, merge_weights(self.base, adapters, lora))
        self._version, self.adapter = version, f"v{version}"


def test_server_mode_syncs_only_the_adapters_of_a_lora_policy(torch_backend, tmp_path):
    """POST /adapters: safetensors bytes and the LoRAConfig as JSON; push_weights sends only them to a server with
    LoRA slots (the base stays where it is), and a server without slots refuses them in one line."""
    from diptych.core.lora import LoRAConfig, init_adapters, merge_weights
    from diptych.core.optim import OptimConfig
    from diptych.rollout.base import push_weights, sync_metrics

    b = torch_backend
    w0 = SPEC.init_weights(0)
    lora = LoRAConfig(r=4, alpha=8, targets=("q_proj", "v_proj"), use_rslora=True)
    shapes = {k[: -len(".weight")]: v.shape for k, v in w0.items() if k.endswith(("q_proj.weight", "v_proj.weight"))}
    adapters = init_adapters(shapes, lora, seed=5)
    adapters = {k: (v + 0.5 if "lora_B" in k else v) for k, v in adapters.items()}  # B != 0: the adapters matter
    state = b.init_train_state(b.build(SPEC, w0), OptimConfig(lr=1e-2))

    class LoRABackend:
        def __getattr__(self, name):
            return getattr(b, name)

        def lora_config(self, model):
            return lora

        def export_adapters(self, model):
            return adapters

    port_file = tmp_path / "url"
    thread = threading.Thread(target=serve, args=(_ServedLoRANative(b, b.build(SPEC, w0)), "127.0.0.1", 0,
                                                  port_file), kwargs={"log": lambda m: None}, daemon=True)
    thread.start()
    for _ in range(200):
        if port_file.is_file():
            break
        thread.join(0.05)
    client = ServerEngine.start(SPEC, w0, config=VLLMConfig(mode="server", url=port_file.read_text().strip()),
                                lora=lora, adapters=adapters, merged=lambda: merge_weights(w0, adapters, lora))
    assert client.serves_lora and client.weight_version == 1
    merged = b.build(SPEC, merge_weights(w0, adapters, lora))
    ref = b.generate(merged, PROMPTS, GREEDY)
    assert not (ref.completion_tokens == b.generate(b.build(SPEC, w0), PROMPTS, GREEDY).completion_tokens).all()
    assert (client.generate(PROMPTS, GREEDY).completion_tokens == ref.completion_tokens).all()
    assert push_weights(client, LoRABackend(), state) == 2
    assert sync_metrics(client) == {"sync/mode": 1.0, "sync/bytes": float(sum(a.nbytes for a in adapters.values()))}
    assert (client.generate(PROMPTS, GREEDY).completion_tokens == ref.completion_tokens).all()
    with pytest.raises(RolloutEngineError, match="exceed the rollout server's max_lora_rank 8"):
        client.sync_adapters(adapters, LoRAConfig(r=16), 3)
    client.shutdown()
    thread.join(10)
    (tmp_path / "plain").mkdir()
    thread, url = _serve_native(b, w0, tmp_path / "plain")  # no LoRA slots: merged weights, and /adapters refused
    plain = ServerEngine.start(SPEC, w0, config=VLLMConfig(mode="server", url=url), lora=lora, adapters=adapters,
                               merged=lambda: merge_weights(w0, adapters, lora))
    assert not plain.serves_lora
    assert (plain.generate(PROMPTS, GREEDY).completion_tokens == ref.completion_tokens).all()
    push_weights(plain, LoRABackend(), state)
    assert sync_metrics(plain)["sync/mode"] == 2.0
    plain.max_lora_rank = 8
    with pytest.raises(RolloutEngineError, match=r"HTTP 400.*serves no LoRA adapters"):
        plain.sync_adapters(adapters, lora, plain.weight_version + 1)
    with pytest.raises(RolloutEngineError, match=r"too few for lora\.r=4"):
        ServerEngine.start(SPEC, w0, config=VLLMConfig(mode="server", url=url, lora_sync="adapters"), lora=lora,
                           adapters=adapters, merged=lambda: merge_weights(w0, adapters, lora))
    plain.shutdown()
    thread.join(10)


def test_async_vllm_generator_leaves_the_trainer_without_an_engine_of_its_own(monkeypatch):
    """With async.generator=vllm the generator role starts the engine; a second, unused one would hold memory."""
    from types import SimpleNamespace

    from diptych.asyncrl.config import AsyncConfig
    from diptych.rollout import engines

    started = []
    monkeypatch.setattr(engines, "make_engine", lambda *a, **k: started.append(a) or "engine")
    base = dict(rollout="vllm", vllm=VLLMConfig(), max_prompt_length=8, max_completion_length=8)
    sync = SimpleNamespace(**base, async_=AsyncConfig())
    assert engines.trainer_engine(sync, None, None, SamplingConfig()) == "engine" and len(started) == 1
    cfg = SimpleNamespace(**base, async_=AsyncConfig(enabled=True, generator="vllm"))
    assert engines.trainer_engine(cfg, None, None, SamplingConfig()) is None and len(started) == 1
