"""The Llama / Qwen2 / Qwen3 / Mistral / SmolLM3 decoder in torch.nn, with a preallocated KV cache.

The math follows transformers' own implementation line for line (RMSNorm in float32 then
cast back before the weight, rotate-half RoPE, softmax in float32), so logits match
each family's ``*ForCausalLM`` to 1e-5 in fp32. RoPE frequencies (every scaling type) come from
``diptych.core.rope`` through the spec; Mistral's sliding window is part of the attention mask. Module
attribute names are the Hugging Face parameter names, so the canonical weight dict *is*
the state dict. ``diptych.backends.jax.model`` is the same text translated to Flax NNX.

``kernels`` (:data:`KERNELS`, one meaning on both backends, see ``diptych.backends.torch.kernels``)
picks the log-prob path (``reference``: full logits; ``chunked``: an ``autograd.Function`` over
chunks of tokens; ``fused``: Triton) and, only when it resolves to ``fused``, the RMSNorm kernel;
every other mode keeps the plain, transformers-matching RMSNorm.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diptych.backends.torch import kernels as kernels_mod
from diptych.core.mesh import check_remat
from diptych.core.spec import DecoderSpec
from diptych.kernels.checks import check_build_args, check_cache_write, check_kernels_mode

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
KERNELS = kernels_mod.KERNEL_MODES
"""``("auto", "fused", "chunked", "reference")``, the same words as the kernels module and the JAX panel."""
LOGPROB_CHUNK_TOKENS = 1024
"""Tokens per chunk in :func:`logprobs` (``chunked``): bounds live logits to ``chunk x vocab`` floats."""

_MASK_VALUE = float(torch.finfo(torch.float32).min)
"""Finite, so a fully padded query row softmaxes to a uniform row instead of NaN."""


# -- the pieces, in data-flow order -------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF order: normalise in float32, cast back to the input dtype, then scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    """``fused`` routes through the Triton kernel; otherwise the plain HF-order expression."""

    def __init__(self, dim: int, eps: float, fused: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.fused = eps, fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return kernels_mod.rms_norm(x, self.weight, self.eps, kernels="fused")
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(spec: DecoderSpec, positions: torch.Tensor) -> torch.Tensor:
    """The spec's frequencies (float32); dynamic NTK raises the base from ``max(positions) + 1`` of
    this call, as transformers' ``dynamic_rope_update`` does per forward (and per decode step)."""
    rope = spec.rope()
    if not rope.dynamic:
        return torch.tensor(spec.rope_inv_freq(), dtype=torch.float32, device=positions.device)
    factor, max_pos, dim = float(rope.fields["factor"]), float(rope.max_position_embeddings), rope.rotary_dim
    length = torch.clamp(positions.max().float() + 1.0, min=max_pos)
    base = rope.theta * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim))


def rope_cos_sin(positions: torch.Tensor, spec: DecoderSpec, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos / sin ``[B, T, head_dim]`` in float32 times the RoPE type's attention scaling (YaRN's
    factor), cast to the compute dtype, in transformers' order."""
    scaling = spec.rope().attention_scaling
    freqs = positions.float()[..., None] * rope_inv_freq(spec, positions)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rope_decode(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope_cos_sin`'s ``[..., B, 1, d]`` tables as one decode step's attention takes them: ``[..., B, 1, 1, d]``
    and ``sin`` with the first half negated, so that ``x * cos + x.roll(d // 2, -1) * sin`` is :func:`apply_rope`
    value for value (negation is exact) in one op instead of four."""
    half = sin.shape[-1] // 2
    return cos.unsqueeze(-2), torch.cat((-sin[..., :half], sin[..., half:]), -1).unsqueeze(-2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved rotary embedding of ``x [B, heads, T, head_dim]``."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Grouped-query softmax attention as in the JAX twin (shapes and HF's ``repeat_kv`` head mapping), with the
    kv heads broadcast through a view of ``k`` / ``v`` rather than copied."""
    b, h, tq, d = q.shape
    kvh = k.shape[1]
    q = q.reshape(b, kvh, h // kvh, tq, d)
    scores = torch.matmul(q, k[:, :, None].transpose(-1, -2)) * (1.0 / math.sqrt(d))
    scores = scores.float().masked_fill(~allowed[:, None, None], _MASK_VALUE)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v[:, :, None]).reshape(b, h, tq, d)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """:func:`attention` for one query per row (``q [B, heads, 1, d]``, ``allowed [B, 1, S]``), as ``[B, kv_heads,
    group, d]`` (the heads in ``repeat_kv`` order). The group's queries share a kv head, so each (row, kv head)
    is one ``[group, d] x [d, S]`` product over the cache as it is (a view of the slots: rows and kv heads
    collapse into one batch dimension without a copy), where the broadcast in :func:`attention` would copy
    the whole cache once per step. Same values as :func:`attention`."""
    b, h, _, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    g = h // kvh
    scores = torch.bmm(q.reshape(b * kvh, g, d), k.reshape(b * kvh, s, d).transpose(1, 2)) * (1.0 / math.sqrt(d))
    scores = torch.where(allowed[:, None], scores.view(b, kvh, g, s).float(), _MASK_VALUE)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.bmm(probs.view(b * kvh, g, s), v.reshape(b * kvh, s, d)).view(b, kvh, g, d)


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, fused: bool = False, use_rope: bool = True) -> None:
        super().__init__()
        h, bias = spec.hidden_size, spec.attention_bias
        self.num_heads, self.num_kv_heads = spec.num_attention_heads, spec.num_key_value_heads
        self.head_dim, self.use_rope = spec.head_dim, use_rope
        self.q_proj = nn.Linear(h, spec.q_dim, bias=bias)
        self.k_proj = nn.Linear(h, spec.kv_dim, bias=bias)
        self.v_proj = nn.Linear(h, spec.kv_dim, bias=bias)
        self.o_proj = nn.Linear(spec.q_dim, h, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, fused)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, fused)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
        """``cache = (k_slots, v_slots, write_index)``: write the new k/v there and attend over all slots (one new
        token per row takes :meth:`_decode`)."""
        b, t, _ = x.shape
        if cache is not None and t == 1:
            return self._decode(x, cos, sin, allowed, cache)
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.use_rope:  # SmolLM3's NoPE layers skip it
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k_slots, v_slots, write_index = cache
            k_slots[:, :, write_index : write_index + t] = k
            v_slots[:, :, write_index : write_index + t] = v
            k, v = k_slots, v_slots
        out = attention(q, k, v, allowed)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def _decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
        """The cache branch for one new token per row: the same arithmetic in fewer tensor ops, since at decode
        sizes each op's dispatch costs more than its math. With one time step ``[B, 1, heads * d]`` already is
        ``[B, heads, 1, d]`` in memory (a view, no transposes), and q and k are rotated as one tensor."""
        b = x.shape[0]
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(b, h, 1, d)
        k = self.k_proj(x).view(b, kvh, 1, d)
        v = self.v_proj(x).view(b, kvh, 1, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            qk = torch.cat((q, k), 1)
            if cos.ndim == 4:  # decode tables [B, 1, 1, d] with rotate_half's signs folded into sin (see rope_decode)
                qk = qk * cos + qk.roll(d // 2, -1) * sin
            else:
                qk = apply_rope(qk, cos, sin)
            q, k = qk[:, :h], qk[:, h:]
        k_slots, v_slots, write_index = cache
        k_slots[:, :, write_index : write_index + 1] = k
        v_slots[:, :, write_index : write_index + 1] = v
        out = decode_attention(q, k_slots, v_slots, allowed)
        return self.o_proj(out.view(b, 1, h * d))


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, fused: bool = False, use_rope: bool = True) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, fused)
        self.self_attn = Attention(spec, fused, use_rope)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, fused)
        self.mlp = MLP(spec)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """HF's ``LlamaModel``: embedding, layers, final norm (named ``model`` in the checkpoint)."""

    def __init__(self, spec: DecoderSpec, fused: bool = False) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(spec, fused, spec.layer_uses_rope(i))
                                     for i in range(spec.num_hidden_layers)])
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, fused)


class Decoder(nn.Module):
    """HF's ``*ForCausalLM``; ``lm_head`` is absent when tied to ``model.embed_tokens``.

    ``kernels`` is the requested mode (``auto`` stays ``auto``); ``fused_norms`` is what it resolved
    to for the norms on the device :func:`build` placed the weights on.
    """

    def __init__(self, spec: DecoderSpec, dtype: str = "float32", kernels: str = "auto",
                 fused_norms: bool = False) -> None:
        super().__init__()
        self.spec, self.dtype, self.kernels = spec, dtype, kernels
        self.model = DecoderStack(spec, fused_norms)
        self.lm_head = None if spec.tie_word_embeddings else nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor,
            cache: KVCache | None = None, write_index: int = 0) -> torch.Tensor:
        """Hidden states after the final norm; with ``cache``, new k/v go to slots from ``write_index``."""
        x = self.model.embed_tokens(tokens)
        cos, sin = rope_cos_sin(positions, self.spec, x.dtype)
        for i, layer in enumerate(self.model.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i], write_index)
            if cache is None and getattr(self, "remat", "none") == "layer" and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, allowed, use_reentrant=False)  # recomputed in the backward
            else:
                x = layer(x, cos, sin, allowed, layer_cache)
        return self.model.norm(x)


def set_remat(model: Decoder, remat: str) -> Decoder:
    """Activation checkpointing of the decoder layers: ``"layer"`` (``torch.utils.checkpoint`` per layer) or
    ``"none"``; the JAX twin is ``diptych.backends.jax.model.set_remat``."""
    model.remat = check_remat(remat)
    return model


@dataclass
class KVCache:
    """Preallocated keys and values, ``[layers, B, kv_heads, max_len, head_dim]`` in the model dtype."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


# -- the module-level API (the facade calls these) ----------------------------------------------
_INIT_FUNCTIONS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                   "xavier_normal_", "zeros_", "ones_", "constant_")
_INIT_LOCK = threading.RLock()  # two threads building at once patch and restore in turn


@contextlib.contextmanager
def _no_meta_init() -> Iterator[None]:
    """``torch.nn.init`` leaves meta tensors alone while modules are built on the meta device.

    A meta tensor holds no data, yet ``normal_`` on one goes through ``torch._refs``, whose first call imports
    ``torch._dynamo``: two seconds of every process's first build (the CLI's, each test worker's, the asynchronous
    generator process's), for nothing. Real tensors still get the real init, so another thread initialising
    weights meanwhile (a LoRA adapter) is unaffected."""
    def skipping(real: Any) -> Any:
        def init(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return tensor if tensor.is_meta else real(tensor, *args, **kwargs)
        return init

    with _INIT_LOCK:
        saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
        for name, real in saved.items():
            setattr(nn.init, name, skipping(real))
        try:
            yield
        finally:
            for name, real in saved.items():
                setattr(nn.init, name, real)


def build(spec: DecoderSpec, weights: dict[str, np.ndarray], dtype: str = "float32", kernels: str = "auto",
          device: str | torch.device | None = None) -> Decoder:
    """A ``Decoder`` holding ``weights`` (validated by name and shape) in ``dtype`` on ``device``.

    ``device`` defaults to CUDA when available. Modules are created on the meta device and
    the weights assigned, so building a large model never pays for a throwaway random init.
    ``kernels`` is resolved against ``device`` now, so ``fused`` where Triton cannot run fails
    here, with what to use instead, rather than at the first forward.
    """
    check_build_args(spec, dtype, kernels, DTYPES, "Triton")
    spec.validate_weights(weights)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    fused = kernels_mod.resolve_kernels(kernels, torch.device(device)) == "fused"
    with torch.device("meta"), _no_meta_init():
        model = Decoder(spec, dtype, kernels, fused_norms=fused)
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)).to(device=device, dtype=DTYPES[dtype])
             for k, v in weights.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def export(model: Decoder) -> dict[str, np.ndarray]:
    """Canonical float32 weights with HF names (no ``lm_head.weight`` when tied)."""
    return {name: p.detach().float().cpu().numpy().copy() for name, p in model.state_dict().items()}


def forward(model: Decoder, tokens: Any, attention_mask: Any = None, *, positions: Any = None) -> torch.Tensor:
    """Logits ``[B, T, V]`` float32 for a left-padded batch."""
    return _project(hidden_states(model, tokens, attention_mask, positions=positions), lm_head_weight(model)).float()


def hidden_states(model: Decoder, tokens: Any, attention_mask: Any = None, *, positions: Any = None) -> torch.Tensor:
    """``[B, T, H]`` after the final norm, in the model dtype: the seam fused log-prob kernels plug into."""
    tokens, mask, positions = _inputs(model, tokens, attention_mask, positions)
    slots = torch.arange(tokens.shape[1], device=tokens.device)
    return model.run(tokens, positions, causal_allowed(slots, slots, mask, model.spec.sliding_window))


def causal_allowed(query_slots: torch.Tensor, key_slots: torch.Tensor, key_mask: torch.Tensor,
                   sliding_window: int | None = None) -> torch.Tensor:
    """``[B, Tq, S]``: key slot at or before the query slot, unmasked, and (Mistral) within the window.

    The window counts slots, as transformers' ``sliding_window_overlay`` does; on a left-padded batch
    a row's real tokens sit in consecutive slots, so that is the same as counting positions.
    """
    ok = key_slots[None, :] <= query_slots[:, None]
    if sliding_window is not None:
        ok = ok & (key_slots[None, :] > query_slots[:, None] - sliding_window)
    return ok[None] & key_mask[:, None, :]


def lm_head_weight(model: Decoder) -> torch.Tensor:
    """``[V, H]``: the output projection, which is the embedding when tied."""
    return model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight


def logprobs(model: Decoder, tokens: Any, attention_mask: Any, targets: Any, temperature: float = 1.0, *,
             kernels: str | None = None) -> torch.Tensor:
    """Full-vocabulary target log-probs ``[B, T]`` (float32) of ``softmax(logits / temperature)``.

    The path is ``kernels`` (default: the model's) of :func:`diptych.backends.torch.kernels.selective_logprobs`,
    resolved against the weights' device before the forward; on CPU ``auto`` is ``chunked``: no ``[B, T, V]``
    logits, forward or backward.
    """
    kernels = model.kernels if kernels is None else kernels
    _check_kernels(kernels)
    kernels_mod.resolve_kernels(kernels, lm_head_weight(model).device)  # fail before the forward, not after
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    hidden = hidden_states(model, tokens, attention_mask)
    targets = _as_long(targets, hidden.device)
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal tokens shape {tuple(hidden.shape[:2])}.")
    lp, _ = kernels_mod.selective_logprobs(hidden, lm_head_weight(model), targets, temperature, kernels=kernels,
                                           chunk_size=LOGPROB_CHUNK_TOKENS)
    return lp


def _project(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The lm_head matmul in the model dtype, as HF computes it before any upcast."""
    return F.linear(h, weight)


# -- KV cache -----------------------------------------------------------------------------------
def init_cache(model: Decoder, batch_size: int, max_len: int) -> KVCache:
    """Zeroed k/v slots for ``batch_size`` rows of up to ``max_len`` tokens."""
    s = model.spec
    like = lm_head_weight(model)
    shape = (s.num_hidden_layers, batch_size, s.num_key_value_heads, max_len, s.head_dim)
    return KVCache(like.new_zeros(shape), like.new_zeros(shape))


@torch.no_grad()
def forward_cached(model: Decoder, tokens: Any, positions: Any, cache: KVCache, write_index: int,
                   key_mask: Any) -> tuple[torch.Tensor, KVCache]:
    """Write the T new tokens' k/v at slots ``write_index..write_index+T-1`` (in place) and return their logits.

    Query ``t`` sits at slot ``write_index + t`` and attends to slots at or before it where
    ``key_mask`` is 1. Prefill: ``write_index = 0``, ``key_mask`` = attention mask padded
    with zeros to ``max_len``; then decode steps with T = 1.
    """
    device = lm_head_weight(model).device
    tokens, positions = _as_long(tokens, device), _as_long(positions, device)
    key_mask = _as_mask(key_mask, device)
    t = tokens.shape[1]
    write_index = int(write_index)
    check_cache_write(tuple(tokens.shape), tuple(positions.shape), tuple(key_mask.shape), cache.k.shape[1],
                      cache.max_len, write_index)
    allowed = causal_allowed(write_index + torch.arange(t, device=device), torch.arange(cache.max_len, device=device),
                             key_mask, model.spec.sliding_window)
    hidden = model.run(tokens, positions, allowed, cache, write_index)
    return _project(hidden, lm_head_weight(model)).float(), cache


# -- input handling -----------------------------------------------------------------------------
def _check_kernels(kernels: Any) -> None:
    check_kernels_mode(kernels, "Triton")


def _as_long(x: Any, device: torch.device) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.is_floating_point():
        raise TypeError(f"Expected an integer array, got dtype {t.dtype}.")
    return t.to(device=device, dtype=torch.long)


def _as_mask(x: Any, device: torch.device) -> torch.Tensor:
    """Any 0/1 array (int, bool or float, as tokenizers return) as a boolean tensor."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(device) != 0


def _inputs(model: Decoder, tokens: Any, attention_mask: Any, positions: Any) -> tuple[torch.Tensor, ...]:
    """Tokens, boolean mask and positions on the model's device; positions default to cumsum(mask) - 1."""
    device = lm_head_weight(model).device
    tokens = _as_long(tokens, device)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, time], got shape {tuple(tokens.shape)}.")
    mask = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else _as_mask(attention_mask, device)
    if mask.shape != tokens.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} must equal tokens shape {tuple(tokens.shape)}.")
    if positions is None:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    else:
        positions = _as_long(positions, device)
        if positions.shape != tokens.shape:
            raise ValueError(f"positions shape {tuple(positions.shape)} must equal tokens shape {tuple(tokens.shape)}.")
    return tokens, mask, positions
