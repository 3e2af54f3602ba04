"""Llama 3.x / linear / dynamic / YaRN RoPE, Llama attention_bias, Qwen2 YaRN, Mistral's sliding
window and SmolLM3's NoPE layers: folders written by transformers load on both backends and give
transformers' logits, greedy tokens and a re-export transformers reads back to the same logits."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core.backend import available_backends, get_backend
from diptych.core.hf import load_hf_folder, save_hf_folder
from diptych.core.sampling import SamplingConfig, prepare_prompts
from tests.models.conftest import CASES, LENGTHS, ORIGINAL_CTX, WINDOW, batch, hf_logits, torch, transformers

BACKENDS = [b for b in ("jax", "torch") if b in available_backends()]
FP32_TOL, BF16_TOL = 1e-5, 2e-2


@pytest.fixture(params=BACKENDS)
def backend(request):
    return get_backend(request.param)


def test_the_batch_runs_past_the_original_context_and_the_window():
    assert max(LENGTHS) > ORIGINAL_CTX and max(LENGTHS) > WINDOW


def test_each_case_loads_as_its_family(hf_folders):
    from diptych.parity.harness import ignored_config_fields

    for name, folder in hf_folders.items():
        spec, _ = load_hf_folder(folder)
        assert spec.model_type == name.split("-")[0]
        assert ignored_config_fields(folder) == [], name  # diptych reads every field transformers wrote
    spec = load_hf_folder(hf_folders["llama-llama3"])[0]
    assert spec.rope_type == "llama3" and dict(spec.rope_parameters)["factor"] == 8.0
    assert load_hf_folder(hf_folders["mistral-window"])[0].sliding_window == WINDOW
    assert load_hf_folder(hf_folders["smollm3"])[0].no_rope_layers == (1, 0)
    assert load_hf_folder(hf_folders["llama-bias"])[0].o_bias


@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_transformers_fp32(backend, hf_folders, name):
    spec, weights = load_hf_folder(hf_folders[name])
    tokens, mask = batch()
    want = hf_logits(hf_folders[name], tokens, mask)
    model = backend.build(spec, weights)
    got = backend.to_numpy(backend.forward(model, backend.from_numpy(tokens), backend.from_numpy(mask)))
    valid = mask.astype(bool)
    assert np.abs(want[valid]).max() > 0.5  # random weights: logits far from zero, so 1e-5 means something
    np.testing.assert_allclose(got[valid], want[valid], atol=FP32_TOL, rtol=0)
    targets = np.roll(tokens, -1, axis=1)
    lp = backend.to_numpy(backend.logprobs(model, backend.from_numpy(tokens), backend.from_numpy(mask),
                                           backend.from_numpy(targets), 1.0))
    ref = np.take_along_axis(want - np.log(np.exp(want - want.max(-1, keepdims=True)).sum(-1, keepdims=True))
                             - want.max(-1, keepdims=True), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(lp[valid], ref[valid], atol=FP32_TOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-llama3", "qwen2-yarn", "mistral-window", "smollm3"])
def test_logits_equal_transformers_bf16(backend, hf_folders, name):
    """torch runs transformers' bf16 arithmetic op for op, so it is held to 2e-2 against transformers' bf16
    logits. XLA's CPU bf16 matmuls round differently, so JAX is held to transformers' own bf16 error band:
    within 2e-2 plus 1.5x transformers' bf16-vs-fp32 gap of the fp32 logits (a dropped bias or a wrong
    RoPE is off by far more)."""
    spec, weights = load_hf_folder(hf_folders[name])
    tokens, mask = batch()
    valid = mask.astype(bool)
    want16 = hf_logits(hf_folders[name], tokens, mask, dtype=torch.bfloat16)[valid]
    want32 = hf_logits(hf_folders[name], tokens, mask)[valid]
    got = backend.to_numpy(backend.forward(backend.build(spec, weights, dtype="bfloat16"),
                                           backend.from_numpy(tokens), backend.from_numpy(mask)))[valid]
    if backend.name == "torch":
        assert np.abs(got - want16).max() <= BF16_TOL
    else:
        assert np.abs(got - want32).max() <= BF16_TOL + 1.5 * np.abs(want16 - want32).max()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24], [3, 4, 5], [9, 8, 7, 6, 5]]
NEW = 32


def hf_greedy(folder, tok: np.ndarray, mask: np.ndarray) -> np.ndarray:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        seq = hf.generate(input_ids=torch.tensor(tok, dtype=torch.long), attention_mask=torch.tensor(mask),
                          do_sample=False, max_new_tokens=NEW, pad_token_id=0, eos_token_id=None)
    return seq[:, tok.shape[1]:].numpy()


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CASES if n != "llama-dynamic"])
def test_greedy_equals_transformers_generate(backend, hf_folders, name):
    spec, weights = load_hf_folder(hf_folders[name])
    cfg = SamplingConfig(temperature=0, max_new_tokens=NEW, eos_ids=(), pad_id=0)
    ro = backend.generate(backend.build(spec, weights), PROMPTS, cfg)
    tok, mask = prepare_prompts(PROMPTS, cfg, spec)
    np.testing.assert_array_equal(ro.completion_tokens, hf_greedy(hf_folders[name], tok, mask))


def test_sampler_generates_past_the_context_for_dynamic_ntk(backend, hf_folders):
    """Dynamic NTK exists to run past max_position_embeddings, so the sampler must not refuse it there."""
    spec, weights = load_hf_folder(hf_folders["llama-dynamic"])
    assert max(map(len, PROMPTS)) > spec.max_position_embeddings
    cfg = SamplingConfig(temperature=0, max_new_tokens=NEW, eos_ids=(), pad_id=0)
    ro = backend.generate(backend.build(spec, weights), PROMPTS, cfg)
    tok, mask = prepare_prompts(PROMPTS, cfg, spec)
    np.testing.assert_array_equal(ro.completion_tokens, hf_greedy(hf_folders["llama-dynamic"], tok, mask))


@pytest.mark.slow
def test_dynamic_ntk_kv_cached_greedy_equals_transformers_generate(backend, hf_folders):
    """Dynamic NTK's frequencies follow the longest position of each call, so the cached keys of the
    prompt and of each decode step are rotated with different bases, as in transformers. This drives the
    KV-cached forward the samplers use step by step, past max_position_embeddings."""
    import importlib

    M = importlib.import_module(f"diptych.backends.{backend.name}.model")
    spec, weights = load_hf_folder(hf_folders["llama-dynamic"])
    assert max(map(len, PROMPTS)) > spec.max_position_embeddings
    width = max(map(len, PROMPTS))
    tok = np.zeros((len(PROMPTS), width), np.int64)
    mask = np.zeros_like(tok)
    for i, p in enumerate(PROMPTS):
        tok[i, width - len(p):], mask[i, width - len(p):] = p, 1
    model = backend.build(spec, weights)
    cache = M.init_cache(model, len(PROMPTS), width + NEW)
    key_mask = np.zeros((len(PROMPTS), width + NEW), bool)
    key_mask[:, :width] = mask != 0
    logits, cache = M.forward_cached(model, tok, np.maximum(mask.cumsum(1) - 1, 0), cache, 0, key_mask)
    next_pos, out = mask.sum(1), []
    for t in range(NEW):
        step = np.asarray(backend.to_numpy(logits))[:, -1].argmax(-1)
        out.append(step)
        key_mask[:, width + t] = True
        logits, cache = M.forward_cached(model, step[:, None], (next_pos + t)[:, None], cache, width + t, key_mask)
    np.testing.assert_array_equal(np.stack(out, 1), hf_greedy(hf_folders["llama-dynamic"], tok, mask))


@pytest.mark.parametrize("name", list(CASES))
def test_export_round_trips_through_transformers(hf_folders, tmp_path, name):
    be = get_backend(BACKENDS[-1])
    spec, weights = load_hf_folder(hf_folders[name])
    out = save_hf_folder(tmp_path / "export", spec, be.export(be.build(spec, weights)))
    tokens, mask = batch()
    valid = mask.astype(bool)
    np.testing.assert_allclose(hf_logits(out, tokens, mask)[valid], hf_logits(hf_folders[name], tokens, mask)[valid],
                               atol=FP32_TOL, rtol=0)
    assert load_hf_folder(out)[0] == spec


@pytest.mark.slow
@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
@pytest.mark.parametrize("name", ["llama-llama3", "llama-dynamic", "qwen2-yarn", "mistral-window", "smollm3",
                                  "llama-bias"])
def test_one_grpo_step_jax_equals_torch(hf_folders, name):
    from diptych.parity.harness import TOLERANCES
    from diptych.parity.train_suite import run_case

    spec, weights = load_hf_folder(hf_folders[name])
    jx, th = (run_case("grpo", get_backend(b), spec, weights, "float32", steps=1) for b in ("jax", "torch"))
    tol = TOLERANCES["float32"]
    assert abs(float(jx["loss@1"]) - float(th["loss@1"])) <= tol["loss"] * max(1.0, abs(float(th["loss@1"])))
    w_j, w_t, w_0 = jx["weights@1"], th["weights@1"], np.concatenate([weights[k].ravel() for k in sorted(weights)])
    assert np.abs(w_t - w_0).max() > 0  # the step moved the weights
    assert np.abs(w_j - w_t).max() <= tol["weights"] * np.abs(w_t).max()
