"""The torch decode fast path (``Attention._decode``, the sampler's lean loop) against independent oracles:
the general attention, transformers' ``generate``, and the seed -> noise contract of the seeded sampler."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core import sampling as S
from diptych.core.spec import tiny_spec
from tests.conftest import needs_transformers

torch = pytest.importorskip("torch")

PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11], [12, 13]]
NEW = 40  # past Mistral's 8-slot window and well past every prompt


def _model(model_type: str):
    from diptych.core.backend import get_backend

    spec = tiny_spec(model_type, initializer_range=0.1)
    return spec, get_backend("torch").build(spec, spec.init_weights(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_general_attention(dtype):
    """One query per row over a strided view of a cache, grouped heads: the same values as ``attention``."""
    from diptych.backends.torch import model as M

    g = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 3, 2, 20, 8, generator=g).to(dtype)  # [k/v, B, kv_heads, slots, d]
    k, v = cache[0, :, :, :13], cache[1, :, :, :13]  # the filled slots, a view as the sampler passes it
    q = torch.randn(3, 6, 1, 8, generator=g).to(dtype)  # 3 query heads per kv head
    allowed = torch.rand(3, 1, 13, generator=g) > 0.4
    allowed[:, :, -1] = True
    want = M.attention(q, k, v, allowed)  # [B, heads, 1, d]
    got = M.decode_attention(q, k, v, allowed)  # [B, kv_heads, group, d]
    torch.testing.assert_close(got.reshape(3, 6, 1, 8), want, rtol=0, atol=0)


@needs_transformers
@pytest.mark.parametrize("model_type", ["mistral", "smollm3", "qwen3"])
def test_greedy_equals_transformers_generate_past_the_window(model_type, tmp_path):
    import transformers

    from diptych.backends.torch import sampler
    from diptych.core.hf import save_hf_folder

    spec, model = _model(model_type)
    folder = save_hf_folder(tmp_path / "ckpt", spec, spec.init_weights(0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    tok, mask = S.prepare_prompts(PROMPTS, S.SamplingConfig(pad_id=0), spec)
    with torch.no_grad():
        want = hf.generate(input_ids=torch.tensor(tok, dtype=torch.long), attention_mask=torch.tensor(mask),
                           do_sample=False, max_new_tokens=NEW, pad_token_id=0, eos_token_id=None)
    ro = sampler.generate(model, PROMPTS, S.SamplingConfig(temperature=0, max_new_tokens=NEW, eos_ids=()))
    np.testing.assert_array_equal(ro.completion_tokens, want[:, tok.shape[1]:].numpy())


def _torch_uniforms(seed: int, rows: int, steps: int, vocab: int) -> np.ndarray:
    """The seeded sampler's contract: step t's uniforms are the t-th ``torch.rand((rows, vocab))`` of a CPU
    generator seeded with ``seed`` (one draw per step, as the loop made them before it drew in blocks)."""
    gen = torch.Generator().manual_seed(seed)
    return np.stack([torch.rand((rows, vocab), generator=gen).numpy() for _ in range(steps)], axis=1)


@pytest.mark.parametrize("block_bytes", [None, 1])
def test_seeded_sampling_draws_the_per_step_uniforms(monkeypatch, block_bytes):
    from diptych.backends.torch import sampler

    if block_bytes is not None:  # one step per draw instead of the whole run in one block
        monkeypatch.setattr(sampler, "GUMBEL_BLOCK_BYTES", block_bytes)
    spec, model = _model("llama")
    cfg = S.SamplingConfig(temperature=0.9, top_k=40, top_p=0.9, max_new_tokens=NEW, n=2, eos_ids=())
    rows = len(PROMPTS) * cfg.n
    seeded = sampler.generate(model, PROMPTS, cfg, seed=5)
    noised = sampler.generate(model, PROMPTS, cfg, noise=_torch_uniforms(5, rows, NEW, spec.vocab_size))
    np.testing.assert_array_equal(seeded.completion_tokens, noised.completion_tokens)
    np.testing.assert_allclose(seeded.logprobs, noised.logprobs, atol=1e-6)
    other = sampler.generate(model, PROMPTS, cfg, seed=6)
    assert (other.completion_tokens != seeded.completion_tokens).any()


def test_stop_bookkeeping_changes_nothing_when_nothing_stops():
    """The loop skips per-row stop tracking without EOS ids or stops; with an EOS id that never comes it
    tracks them, and every output must be the same."""
    from diptych.backends.torch import sampler

    _, model = _model("llama")
    plain = sampler.generate(model, PROMPTS, S.SamplingConfig(temperature=0, max_new_tokens=NEW, eos_ids=()))
    unused = next(i for i in range(3, 128) if i not in plain.completion_tokens)
    cfg = S.SamplingConfig(temperature=0, max_new_tokens=NEW, eos_ids=(unused,), stop_sequences=((unused, 1),))
    tracked = sampler.generate(model, PROMPTS, cfg)
    for name in ("completion_tokens", "completion_mask", "logprobs", "lengths", "truncated"):
        np.testing.assert_array_equal(getattr(tracked, name), getattr(plain, name), err_msg=name)
    assert plain.completion_mask.all() and plain.truncated.all()


@pytest.mark.parametrize("every", [3, 64])
def test_late_stop_checks_give_the_same_rollout(monkeypatch, every):
    """On an accelerator the loop asks "has every row stopped?" only every few steps (a host sync); decoding
    rows that already stopped must leave tokens, masks, log-probs, lengths and flags as the per-step check does."""
    from diptych.backends.torch import sampler

    _, model = _model("llama")
    greedy = sampler.generate(model, PROMPTS, S.SamplingConfig(temperature=0, max_new_tokens=NEW, eos_ids=()))
    eos = tuple(int(greedy.completion_tokens[r, c]) for r, c in ((0, 3), (1, 6), (2, 2), (3, 9)))
    cfg = S.SamplingConfig(temperature=0, max_new_tokens=NEW, eos_ids=eos, pad_id=0)
    want = sampler.generate(model, PROMPTS, cfg, seed=1)
    assert (want.lengths < NEW).all()  # every row stops early, so the loop can exit before the last step
    monkeypatch.setattr(sampler, "_stop_check_every", lambda device: every)
    got = sampler.generate(model, PROMPTS, cfg, seed=1)
    for name in ("completion_tokens", "completion_mask", "logprobs", "lengths", "truncated"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_decode_tables_rotate_as_apply_rope(dtype):
    """The decode step's sign-folded tables and one roll give apply_rope's values exactly."""
    from diptych.backends.torch import model as M

    spec = tiny_spec("llama")
    positions = torch.tensor([[3], [40], [0]])
    cos, sin = M.rope_cos_sin(positions, spec, dtype)  # [B, 1, d]
    x = torch.randn(3, 6, 1, spec.head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    cos4, sin4 = M.rope_decode(cos, sin)
    got = x * cos4 + x.roll(spec.head_dim // 2, -1) * sin4
    torch.testing.assert_close(got, M.apply_rope(x, cos, sin), rtol=0, atol=0)
