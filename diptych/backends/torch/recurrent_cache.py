"""KV-cached decoding of recurrent-depth models in torch: prefill once, then one position per token.

The cache holds preallocated buffers ``[..., B, T_max, kv_heads, head_dim]``: one slot per
prelude layer, one per (core layer, iteration) and one per coda layer, plus the key-validity
mask (left padding and finished rows are never attended) and each row's next RoPE position.
Writes are in-place index updates; attention reads only the columns filled so far. A token that
exited at depth d < num_steps gets its slots d+1..num_steps filled with its slot d (Huginn's
"latest" fallback), row by row. Mirrors ``diptych.backends.jax.recurrent_cache``; the loop
that drives it is ``diptych.recurrent.generate``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diptych.backends.torch.recurrent_layers import RecurrentLM, SandwichBlock, _attend, _rope_tables, model_device


class Cache:
    """Zeroed buffers for ``rows`` sequences of up to ``capacity`` tokens at up to ``steps`` iterations."""

    def __init__(self, model: RecurrentLM, rows: int, capacity: int, steps: int) -> None:
        spec, dev = model.spec, model_device(model)
        dtype = model.transformer.wte.weight.dtype
        kv = (rows, capacity, spec.num_key_value_heads, spec.head_dim)
        pre, core, coda = spec.n_layers_in_prelude, spec.n_layers_in_recurrent_block, spec.n_layers_in_coda
        z = dict(dtype=dtype, device=dev)
        self.pre_k, self.pre_v = torch.zeros(pre, *kv, **z), torch.zeros(pre, *kv, **z)
        self.core_k, self.core_v = torch.zeros(core, steps, *kv, **z), torch.zeros(core, steps, *kv, **z)
        self.coda_k, self.coda_v = torch.zeros(coda, *kv, **z), torch.zeros(coda, *kv, **z)
        self.valid = torch.zeros(rows, capacity, dtype=torch.bool, device=dev)
        self.count = torch.zeros(rows, dtype=torch.long, device=dev)


def _cached_block(block: SandwichBlock, x: torch.Tensor, rope, kb: torch.Tensor, vb: torch.Tensor, col: int,
                  allowed: torch.Tensor) -> torch.Tensor:
    """A sandwich block whose new K/V are written at ``col`` before its queries read the filled columns."""
    q, k, v = block.attn.qkv(block.norm_1(x), rope)
    end = col + x.shape[1]
    kb[:, col:end], vb[:, col:end] = k, v
    a = block.attn.proj(_attend(q, kb[:, :end], vb[:, :end], allowed[..., :end]).flatten(2))
    x = block.norm_2(a + x)
    return block.norm_4(block.mlp(block.norm_3(x)) + x)


def _stack(blocks, x: torch.Tensor, rope, ck: torch.Tensor, cv: torch.Tensor, col: int,
           allowed: torch.Tensor) -> torch.Tensor:
    for layer, block in enumerate(blocks):
        x = _cached_block(block, x, rope, ck[layer], cv[layer], col, allowed)
    return x


def _core(model: RecurrentLM, cache: Cache, x: torch.Tensor, e: torch.Tensor, rope, it: int, col: int,
          allowed: torch.Tensor) -> torch.Tensor:
    """Iteration ``it`` (0-based) of the core block, reading and writing the (layer, it) slots."""
    x = model.transformer.adapter(torch.cat([x, e], dim=-1))
    for layer, block in enumerate(model.transformer.core_block):
        x = _cached_block(block, x, rope, cache.core_k[layer, it], cache.core_v[layer, it], col, allowed)
    return x


def _readout(model: RecurrentLM, cache: Cache, x: torch.Tensor, rope, col: int, allowed: torch.Tensor) -> torch.Tensor:
    """ln_f, the coda (its K/V written at ``col``), ln_f, head: float32 logits of the last position."""
    ln_f = model.transformer.ln_f
    h = _stack(model.transformer.coda, ln_f(x), rope, cache.coda_k, cache.coda_v, col, allowed)
    return F.linear(ln_f(h[:, -1]), model.head_weight()).float()


def _embed(model: RecurrentLM, tokens: torch.Tensor) -> torch.Tensor:
    return model.transformer.wte(tokens) * model.spec.embed_scale


class _Token:
    """One fed position: its arrays, its column, and how many iterations it has run."""

    def __init__(self, e: torch.Tensor, rope, allowed: torch.Tensor, col: int) -> None:
        self.e, self.rope, self.allowed, self.col, self.it = e, rope, allowed, col, 0


class Decoder:
    """The cached primitives ``diptych.recurrent.generate`` drives (numpy at the boundary)."""

    def __init__(self, model: RecurrentLM, rows: int, capacity: int, steps: int) -> None:
        self.model, self.spec, self.device = model, model.spec, model_device(model)
        self.cache = Cache(model, rows, capacity, steps)
        self.capacity, self.steps, self.col = capacity, steps, 0

    def _in(self, a: Any, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a)).to(device=self.device, dtype=dtype)

    @torch.no_grad()
    def prefill(self, tokens: np.ndarray, mask: np.ndarray, s0: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """The prompt at full depth (no exit): (last-position logits, last-position final state [B, 1, H])."""
        c, model = self.cache, self.model
        tok, msk = self._in(tokens, torch.long), self._in(mask, torch.long)
        S = tok.shape[1]
        rope = _rope_tables((msk.cumsum(-1) - 1).clamp(min=0), self.spec.head_dim, self.spec.rope_base)
        c.valid[:, :S] = msk > 0
        c.count = msk.sum(-1)
        causal = torch.ones(S, S, dtype=torch.bool, device=self.device).tril()
        allowed = causal[None] & c.valid[:, None, :S]
        e = _stack(model.transformer.prelude, _embed(model, tok), rope, c.pre_k, c.pre_v, 0, allowed)
        x = self._in(s0, e.dtype)
        for it in range(self.steps):
            x = _core(model, c, x, e, rope, it, 0, allowed)
        logits = _readout(model, c, x, rope, 0, allowed)
        self.col = S
        return logits.cpu().numpy(), x[:, -1:]

    @torch.no_grad()
    def feed(self, tokens: np.ndarray, valid: np.ndarray) -> _Token:
        """One new position per row: its RoPE position is the row's count of real tokens so far."""
        if self.col >= self.capacity:
            raise ValueError(f"KV cache is full ({self.capacity} columns); size it for prompt + max_new_tokens.")
        c, col = self.cache, self.col
        ok = self._in(valid, torch.bool)
        rope = _rope_tables(c.count[:, None], self.spec.head_dim, self.spec.rope_base)
        c.valid[:, col] = ok
        c.count = c.count + ok.long()
        allowed = c.valid[:, None, : col + 1]
        e = _stack(self.model.transformer.prelude, _embed(self.model, self._in(tokens, torch.long)[:, None]), rope,
                   c.pre_k, c.pre_v, col, allowed)
        return _Token(e, rope, allowed, col)

    def init(self, ctx: _Token, s0: np.ndarray) -> torch.Tensor:
        return self._in(s0, ctx.e.dtype)

    @torch.no_grad()
    def step(self, ctx: _Token, x: torch.Tensor) -> torch.Tensor:
        x = _core(self.model, self.cache, x, ctx.e, ctx.rope, ctx.it, ctx.col, ctx.allowed)
        ctx.it += 1
        return x

    @torch.no_grad()
    def logits_last(self, ctx: _Token, x: torch.Tensor) -> np.ndarray:
        return _readout(self.model, self.cache, x, ctx.rope, ctx.col, ctx.allowed).cpu().numpy()

    def latent_last(self, x: torch.Tensor) -> np.ndarray:
        return x[:, -1].float().cpu().numpy()

    def select(self, keep: np.ndarray, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(self._in(keep, torch.bool)[:, None, None], old, new)

    @torch.no_grad()
    def finish(self, ctx: _Token, used: np.ndarray) -> None:
        """Fill the slots a row skipped by exiting early, then move to the next column."""
        used = np.asarray(used)
        if (used < self.steps).any():
            c, rows = self.cache, used.shape[0]
            src = torch.as_tensor(np.minimum(np.arange(self.steps)[:, None], used[None, :] - 1), device=self.device)
            b = torch.arange(rows, device=self.device)[None, :]
            for buf in (c.core_k, c.core_v):
                buf[:, :, :, ctx.col] = buf[:, src, b, ctx.col]
        self.col = ctx.col + 1
