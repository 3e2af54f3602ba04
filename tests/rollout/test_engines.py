"""The rollout-engine seam without vLLM: the protocol, the native engine, the checks, the refusals, and
the rollout server's HTTP wire (a native engine behind it), so the main environment covers everything
but vLLM itself (tests/rollout/test_vllm.py needs the vLLM venv: scripts/vllm_env.sh)."""

from __future__ import annotations

import importlib.util
import threading

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
