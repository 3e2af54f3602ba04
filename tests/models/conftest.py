"""Tiny random checkpoints of the post-trained families, built with transformers' own config classes.

Every parameter (biases and norms included) is drawn at random, so a bias diptych dropped or a
layer that skipped (or wrongly applied) RoPE changes the logits well beyond the tolerance.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

ORIGINAL_CTX = 16
"""The RoPE scaling's original context: the test batch (24 tokens) and generation run past it."""
WINDOW = 8
"""Mistral's sliding window, shorter than the batch."""
LENGTHS = (24, 17, 9)
"""A left-padded batch whose longest row exceeds ORIGINAL_CTX and WINDOW."""

_BASE: dict[str, Any] = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64, pad_token_id=0, bos_token_id=1,
                             eos_token_id=2)

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-llama3": ("LlamaConfig", dict(max_position_embeddings=128, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL_CTX, "rope_theta": 500.0})),
    "llama-linear": ("LlamaConfig", dict(max_position_embeddings=64, rope_scaling={
        "rope_type": "linear", "factor": 4.0, "rope_theta": 100.0})),
    "llama-dynamic": ("LlamaConfig", dict(max_position_embeddings=ORIGINAL_CTX, rope_scaling={
        "rope_type": "dynamic", "factor": 4.0, "rope_theta": 100.0})),
    "llama-yarn": ("LlamaConfig", dict(max_position_embeddings=64, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL_CTX, "rope_theta": 100.0})),
    "llama-bias": ("LlamaConfig", dict(max_position_embeddings=64, attention_bias=True)),
    "qwen2-yarn": ("Qwen2Config", dict(max_position_embeddings=64, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL_CTX, "rope_theta": 100.0})),
    "mistral-window": ("MistralConfig", dict(max_position_embeddings=128, sliding_window=WINDOW, head_dim=16)),
    "smollm3": ("SmolLM3Config", dict(max_position_embeddings=128, no_rope_layer_interval=2, attention_bias=True,
                                      tie_word_embeddings=True)),
}


def build_hf(name: str, seed: int = 0) -> Any:
    """A transformers model of case ``name`` with every parameter random (seeded)."""
    cls, extra = CASES[name]
    config = getattr(transformers, cls)(**{**_BASE, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1.0 + 0.1 * noise if "norm" in pname else 0.15 * noise)
    return model.eval()


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory) -> dict[str, Any]:
    """case name -> a folder written by transformers' ``save_pretrained``."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in CASES:
        folder = root / name
        build_hf(name).save_pretrained(folder)
        out[name] = folder
    return out


def batch(vocab: int = _BASE["vocab_size"], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from diptych.parity.harness import left_padded_batch

    return left_padded_batch(vocab, list(LENGTHS), seed)


def hf_logits(folder: Any, tokens: np.ndarray, mask: np.ndarray, dtype: Any = None) -> np.ndarray:
    """transformers' logits from the folder itself, positions counted from each row's first token."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                              dtype=dtype or torch.float32).eval()
    t, m = torch.as_tensor(tokens, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)
    with torch.no_grad():
        return model(input_ids=t, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0)).logits.float().numpy()
