"""Fixed, seeded micro-batches for train-step tests (the same numpy arrays feed both backends)."""

from __future__ import annotations

import numpy as np

from diptych.core.spec import tiny_spec


def spec(model_type: str = "llama", **kw):
    return tiny_spec(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, **kw)


def _tokens(rng: np.random.Generator, b: int, t: int, vocab: int, prompt: int) -> tuple[np.ndarray, ...]:
    """Left-padded rows: some pad, then a prompt and a completion; mask marks completion targets."""
    tokens = rng.integers(1, vocab, size=(b, t)).astype(np.int32)
    am = np.ones((b, t), np.int32)
    pads = rng.integers(0, 3, size=b)
    for i, p in enumerate(pads):
        am[i, :p] = 0
        tokens[i, :p] = 0
    mask = np.zeros((b, t - 1), np.float32)
    mask[:, prompt - 1:] = 1.0
    ends = rng.integers(prompt + 1, t, size=b)  # variable completion lengths
    for i, e in enumerate(ends):
        mask[i, e:] = 0.0
    return tokens, am, mask


def grpo_batch(seed: int = 0, b: int = 8, t: int = 12, vocab: int = 64, beta: float = 0.04) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens, am, mask = _tokens(rng, b, t, vocab, prompt=5)
    old = (np.log(1.0 / vocab) + 0.1 * rng.standard_normal((b, t - 1))).astype(np.float32)
    out = {"tokens": tokens, "attention_mask": am, "mask": mask, "old_logprobs": old,
           "advantages": rng.standard_normal(b).astype(np.float32)}
    if beta > 0:
        out["ref_logprobs"] = (old + 0.05 * rng.standard_normal((b, t - 1))).astype(np.float32)
    return out


def dpo_batch(seed: int = 0, b: int = 8, t: int = 12, vocab: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for side in ("chosen", "rejected"):
        tokens, am, mask = _tokens(rng, b, t, vocab, prompt=4)
        out[f"{side}_tokens"], out[f"{side}_attention_mask"], out[f"{side}_mask"] = tokens, am, mask
        out[f"ref_{side}_logprobs"] = (np.log(1.0 / vocab) + 0.1 * rng.standard_normal((b, t - 1))).astype(np.float32)
    return out


def sft_batch(seed: int = 0, b: int = 8, t: int = 12, vocab: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens, am, mask = _tokens(rng, b, t, vocab, prompt=4)
    return {"tokens": tokens, "attention_mask": am, "mask": mask}


def ppo_batch(seed: int = 0, b: int = 8, t: int = 12, vocab: int = 64) -> dict[str, np.ndarray]:
    out = grpo_batch(seed, b, t, vocab, beta=0.0)
    rng = np.random.default_rng(seed + 100)
    out["advantages"] = rng.standard_normal((b, t - 1)).astype(np.float32)
    out["old_values"] = (0.1 * rng.standard_normal((b, t - 1))).astype(np.float32)
    out["returns"] = rng.standard_normal((b, t - 1)).astype(np.float32)
    return out
