"""Shared builders for the recurrent tests: a tiny spec with non-trivial norms and qk_bias."""

from __future__ import annotations

import numpy as np

from diptych.core.recurrent_spec import RecurrentSpec, tiny_recurrent_spec


def spec_and_weights(seed: int = 0, **overrides) -> tuple[RecurrentSpec, dict[str, np.ndarray]]:
    """Init weights, then perturb the ones init leaves constant (norms, qk_bias) so they are tested."""
    spec = tiny_recurrent_spec(**overrides)
    w = spec.init_weights(seed)
    rng = np.random.default_rng(seed + 100)
    for k in w:
        if "norm" in k or "ln_f" in k:
            w[k] = (1 + 0.1 * rng.standard_normal(w[k].shape)).astype(np.float32)
        elif "qk_bias" in k or k.endswith(".bias"):
            w[k] = (0.1 * rng.standard_normal(w[k].shape)).astype(np.float32)
    return spec, w


def batch(seed: int = 0, b: int = 2, t: int = 6, vocab: int = 128, pad_first_row: int = 2):
    """Tokens with LEFT padding on row 0, the mask, and random targets."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (b, t)).astype(np.int64)
    mask = np.ones((b, t), np.int64)
    mask[0, :pad_first_row] = 0
    tokens[0, :pad_first_row] = 0
    targets = rng.integers(0, vocab, (b, t)).astype(np.int64)
    return tokens, mask, targets


def bypass_sandwich_norms(monkeypatch) -> None:
    """Make torch's Huginn blocks compute Llama's pre-norm blocks (and ``ln_f`` once, after the coda), so a
    retrofitted model's carried-over weights can be checked exactly against the source Llama."""
    import diptych.backends.torch.recurrent_layers as L

    def llama_block(self, x, rope, allowed):
        x = self.attn(self.norm_1(x), rope, allowed) + x
        return self.mlp(self.norm_3(x)) + x

    def coda_then_ln_f(model, ctx, x):
        for block in model.transformer.coda:
            x = block(x, ctx.rope, ctx.allowed)
        return model.transformer.ln_f(x)

    monkeypatch.setattr(L.SandwichBlock, "forward", llama_block)
    monkeypatch.setattr(L, "final_hidden", coda_then_ln_f)
