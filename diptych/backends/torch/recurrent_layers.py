"""The layers of torch recurrent-depth (Huginn) models: modules, sandwich blocks, one iteration.

Shared by the full-sequence model (``diptych.backends.torch.recurrent``) and KV-cached decoding
(``diptych.backends.torch.recurrent_cache``), which both import it, so neither imports the
other's internals. Module names equal Huginn's checkpoint names. Mirrors
``diptych.backends.jax.recurrent_layers``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diptych.core.recurrent_spec import RecurrentSpec
from diptych.recurrent.inputs import check_init_state, check_token_ids

_NEG = -1e30


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, spec: RecurrentSpec) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = spec.n_heads, spec.num_key_value_heads, spec.head_dim
        self.Wqkv = nn.Linear(spec.n_embd, (self.nh + 2 * self.nkv) * self.hd, bias=False)
        if spec.qk_bias:
            self.qk_bias = nn.Parameter(torch.zeros(2, 1, self.nh, self.hd))
        else:
            self.qk_bias = None
        self.proj = nn.Linear(spec.n_embd, spec.n_embd, bias=False)

    def qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        B, S, _ = x.shape
        q, k, v = self.Wqkv(x).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q, k, v = q.view(B, S, self.nh, self.hd), k.view(B, S, self.nkv, self.hd), v.view(B, S, self.nkv, self.hd)
        if self.qk_bias is not None:
            q, k = q + self.qk_bias[0], k + self.qk_bias[1]
        return _rope(q, rope), _rope(k, rope), v

    def forward(self, x: torch.Tensor, rope, allowed: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x, rope)
        return self.proj(_attend(q, k, v, allowed).flatten(2))


class GatedMLP(nn.Module):
    def __init__(self, spec: RecurrentSpec) -> None:
        super().__init__()
        self.fc = nn.Linear(spec.n_embd, 2 * spec.intermediate_size, bias=False)
        self.proj = nn.Linear(spec.intermediate_size, spec.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(a) * b)


class SandwichBlock(nn.Module):
    def __init__(self, spec: RecurrentSpec) -> None:
        super().__init__()
        eps = spec.norm_eps
        self.norm_1, self.attn, self.norm_2 = RMSNorm(spec.n_embd, eps), Attention(spec), RMSNorm(spec.n_embd, eps)
        self.mlp, self.norm_3, self.norm_4 = GatedMLP(spec), RMSNorm(spec.n_embd, eps), RMSNorm(spec.n_embd, eps)

    def forward(self, x: torch.Tensor, rope, allowed: torch.Tensor) -> torch.Tensor:
        x = self.norm_2(self.attn(self.norm_1(x), rope, allowed) + x)
        return self.norm_4(self.mlp(self.norm_3(x)) + x)


class RecurrentLM(nn.Module):
    """Huginn's ``RavenForCausalLM`` layout; ``spec`` and ``dtype`` ride along for the facade."""

    def __init__(self, spec: RecurrentSpec) -> None:
        super().__init__()
        self.spec = spec
        h = spec.n_embd
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(spec.padded_vocab_size, h),
            prelude=nn.ModuleList(SandwichBlock(spec) for _ in range(spec.n_layers_in_prelude)),
            adapter=nn.Linear(2 * h, h, bias=spec.bias),
            core_block=nn.ModuleList(SandwichBlock(spec) for _ in range(spec.n_layers_in_recurrent_block)),
            coda=nn.ModuleList(SandwichBlock(spec) for _ in range(spec.n_layers_in_coda)),
            ln_f=RMSNorm(h, spec.norm_eps),
        ))
        self.lm_head = None if spec.tie_embeddings else nn.Linear(h, spec.padded_vocab_size, bias=False)

    def head_weight(self) -> torch.Tensor:
        return self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight


# -- math shared by every entry point ------------------------------------------------------
def _rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) as complex numbers, in float32 like Huginn."""
    cos, sin = rope
    xf = x.float()
    re, im = xf[..., 0::2], xf[..., 1::2]
    return torch.stack([re * cos - im * sin, im * cos + re * sin], dim=-1).flatten(-2).type_as(x)


def _rope_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    ang = positions.to(torch.float32)[..., None] * inv  # [B, S, hd/2]
    return torch.cos(ang)[:, :, None, :], torch.sin(ang)[:, :, None, :]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax attention over [B, S, H, D] / [B, K, Hkv, D]; ``allowed`` is [B, S, K] bool."""
    rep = q.shape[2] // k.shape[2]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bshd,bkhd->bhsk", q, k).float() / (q.shape[-1] ** 0.5)
    scores = scores.masked_fill(~allowed[:, None], _NEG)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.einsum("bhsk,bkhd->bshd", probs, v)


class Context:
    """What every iteration needs besides the state: the prelude output e, RoPE tables, the mask."""

    def __init__(self, e: torch.Tensor, rope, allowed: torch.Tensor) -> None:
        self.e, self.rope, self.allowed = e, rope, allowed


def model_device(model: RecurrentLM) -> torch.device:
    return model.transformer.wte.weight.device


def to_model(model: RecurrentLM, x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Any array input (numpy, list, tensor on any device) as a tensor on the model's device."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(device=model_device(model), dtype=dtype)


def prelude(model: RecurrentLM, tokens: Any, attention_mask: Any = None) -> Context:
    """Embed (times Huginn's embedding scale) and run the prelude: the e re-injected every step."""
    tokens = tokens if isinstance(tokens, torch.Tensor) else torch.as_tensor(np.asarray(tokens))
    # on the host side of the transfer: ids are checked before any launch
    empty = tokens.numel() == 0 or tokens.ndim != 2
    check_token_ids(tuple(tokens.shape), None if empty else int(tokens.min()), None if empty else int(tokens.max()),
                    model.spec.padded_vocab_size)
    tokens = to_model(model, tokens, torch.long)
    mask = torch.ones_like(tokens) if attention_mask is None else to_model(model, attention_mask, torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    rope = _rope_tables(positions, model.spec.head_dim, model.spec.rope_base)
    S = tokens.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=tokens.device).tril()
    allowed = causal[None] & mask.bool()[:, None, :]
    e = model.transformer.wte(tokens) * model.spec.embed_scale
    for block in model.transformer.prelude:
        e = block(e, rope, allowed)
    return Context(e, rope, allowed)


def core_step(model: RecurrentLM, ctx: Context, x: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
    """One recurrence: s <- core_block(adapter(concat[s, e]))."""
    x = model.transformer.adapter(torch.cat([x, ctx.e if e is None else e], dim=-1))
    for block in model.transformer.core_block:
        x = block(x, ctx.rope, ctx.allowed)
    return x


def final_hidden(model: RecurrentLM, ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """ln_f after the recurrence, the coda, ln_f again: what the head reads."""
    x = model.transformer.ln_f(x)
    for block in model.transformer.coda:
        x = block(x, ctx.rope, ctx.allowed)
    return model.transformer.ln_f(x)


def readout(model: RecurrentLM, ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """Float32 logits from a latent state."""
    return F.linear(final_hidden(model, ctx, x), model.head_weight()).float()


def initial_state(model: RecurrentLM, ctx: Context, init_state: Any) -> torch.Tensor:
    """The caller's s0 (numpy or tensor, [B, T, H]) or zeros: randomness is an input."""
    if init_state is None:
        return torch.zeros_like(ctx.e)
    s0 = init_state if isinstance(init_state, torch.Tensor) else torch.as_tensor(np.asarray(init_state))
    check_init_state(tuple(s0.shape), tuple(ctx.e.shape))
    return s0.to(device=ctx.e.device, dtype=ctx.e.dtype)
