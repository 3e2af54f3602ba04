"""Recurrent-depth (Huginn) models in torch: prelude -> core block r times -> coda.

Module names equal Huginn's checkpoint names (``transformer.core_block.0.attn.Wqkv`` ...), so
``state_dict()`` is the canonical weight dict. The training forward runs the first r - k
iterations under ``torch.no_grad`` and the last k with gradient, each rematerialised with
``torch.utils.checkpoint``, so activation memory grows with k, not r. Mirrors
``diptych.backends.jax.recurrent`` function for function.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diptych.core.recurrent_spec import RecurrentSpec
from diptych.core.spec import SpecError

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
    _check_tokens(model.spec, tokens)  # on the host side of the transfer: ids are checked before any launch
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
    if tuple(s0.shape) != tuple(ctx.e.shape):
        raise ValueError(f"init_state has shape {tuple(s0.shape)}, expected [batch, time, n_embd] = "
                         f"{tuple(ctx.e.shape)}; draw it with diptych.core.recurrent_spec.initial_state_noise.")
    return s0.to(device=ctx.e.device, dtype=ctx.e.dtype)


# -- public API (the facade calls these) ------------------------------------------------------
def build(spec: RecurrentSpec, weights: dict[str, np.ndarray], dtype: str = "float32", **options: Any) -> RecurrentLM:
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}.")
    spec.validate_weights(weights)
    model = RecurrentLM(spec)
    state = {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise SpecError(f"Weights do not fit the recurrent model: missing {missing}, unexpected {unexpected}.")
    device = options.pop("device", None) or "cpu"  # every entry point moves its inputs to this device
    model = model.to(device=device, dtype=getattr(torch, dtype))
    model.dtype_name = dtype
    set_depth(model, options.pop("num_steps", None), options.pop("num_grad_steps", None))
    if options:
        raise TypeError(f"Unknown build option(s) for a recurrent model: {', '.join(sorted(options))}.")
    return model


def set_depth(model: RecurrentLM, num_steps: int | None = None, num_grad_steps: int | None = None) -> None:
    """The depth used when a call passes none: how a depth-unaware trainer runs a recurrent model.

    ``num_grad_steps`` set means truncated backprop; a trainer following a ``DepthSchedule``
    calls this once per step with ``draw.num_steps, draw.n_grad``.
    """
    _split_steps(model.spec, num_steps, num_grad_steps)  # validate now, not at first use
    model.depth = (num_steps, num_grad_steps)


def export(model: RecurrentLM) -> dict[str, np.ndarray]:
    return {k: v.detach().float().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _split_steps(spec: RecurrentSpec, num_steps: Any, num_grad_steps: int | None) -> tuple[int, int]:
    """(iterations without gradient, iterations with gradient) from the many ways to say it."""
    if num_steps is None:
        num_steps = spec.mean_recurrence
    if isinstance(num_steps, (tuple, list)):
        n_no_grad, n_grad = (int(v) for v in num_steps)
    else:
        r = int(num_steps)
        if r < 0:
            raise ValueError(f"num_steps must be >= 0, got {r}.")
        if num_grad_steps is None:
            return 0, r
        if int(num_grad_steps) < 1:
            raise ValueError(f"num_grad_steps (backprop depth k) must be >= 1, got {num_grad_steps}.")
        n_grad = min(r, int(num_grad_steps))
        n_no_grad = r - n_grad
    if n_no_grad < 0 or n_grad < 0:
        raise ValueError(f"step counts must be >= 0, got ({n_no_grad}, {n_grad}).")
    return n_no_grad, n_grad


def _iterate(model: RecurrentLM, ctx: Context, x: torch.Tensor, n_no_grad: int, n_grad: int,
             remat: bool) -> torch.Tensor:
    """r - k iterations with no tape, then k differentiable ones (each rematerialised when ``remat``)."""
    with torch.no_grad():
        e_const = ctx.e.detach()
        for _ in range(n_no_grad):
            x = core_step(model, ctx, x, e_const)
    x = x.detach() if n_no_grad else x
    use_ckpt = remat and torch.is_grad_enabled()
    for _ in range(n_grad):
        if use_ckpt:
            x = checkpoint(core_step, model, ctx, x, ctx.e, use_reentrant=False)
        else:
            x = core_step(model, ctx, x)
    return x


def latent_forward(model: RecurrentLM, tokens: Any, attention_mask: Any = None, *, num_steps: Any = None,
                   num_grad_steps: int | None = None, init_state: Any = None, remat: bool = True):
    """(logits, final latent state): the r - k no-grad iterations, then k checkpointed ones."""
    if num_steps is None and num_grad_steps is None:
        num_steps, num_grad_steps = getattr(model, "depth", (None, None))
    ctx = prelude(model, tokens, attention_mask)
    x = initial_state(model, ctx, init_state)
    n_no_grad, n_grad = _split_steps(model.spec, num_steps, num_grad_steps)
    x = _iterate(model, ctx, x, n_no_grad, n_grad, remat and num_grad_steps is not None)
    return readout(model, ctx, x), x


def forward(model: RecurrentLM, tokens: Any, attention_mask: Any = None, *, num_steps: Any = None,
            init_state: Any = None, num_grad_steps: int | None = None, **kw: Any) -> torch.Tensor:
    """Logits [B, T, V] float32 after ``num_steps`` iterations (default: the spec's mean recurrence).

    Differentiable through every iteration unless ``num_grad_steps`` truncates it.
    """
    _reject(kw)
    return latent_forward(model, tokens, attention_mask, num_steps=num_steps, num_grad_steps=num_grad_steps,
                          init_state=init_state)[0]


def forward_train(model: RecurrentLM, tokens: Any, mask: Any, *, num_steps: int, num_grad_steps: int,
                  init_state: Any = None) -> torch.Tensor:
    """Truncated-backprop logits: gradient flows through the last ``num_grad_steps`` iterations only."""
    return latent_forward(model, tokens, mask, num_steps=num_steps, num_grad_steps=num_grad_steps,
                          init_state=init_state)[0]


def hidden_states(model: RecurrentLM, tokens: Any, attention_mask: Any = None, *, num_steps: Any = None,
                  num_grad_steps: int | None = None, init_state: Any = None, **kw: Any) -> torch.Tensor:
    """[B, T, H] after the final norm (the decoder API's seam for fused log-prob kernels)."""
    _reject(kw)
    if num_steps is None and num_grad_steps is None:
        num_steps, num_grad_steps = getattr(model, "depth", (None, None))
    ctx = prelude(model, tokens, attention_mask)
    x = initial_state(model, ctx, init_state)
    n_no_grad, n_grad = _split_steps(model.spec, num_steps, num_grad_steps)
    x = _iterate(model, ctx, x, n_no_grad, n_grad, num_grad_steps is not None)
    return final_hidden(model, ctx, x)


def lm_head_weight(model: RecurrentLM) -> torch.Tensor:
    """[V, H]: the embedding when tied."""
    return model.head_weight()


def logprobs(model: RecurrentLM, tokens: Any, attention_mask: Any, targets: Any, temperature: float = 1.0, *,
             num_steps: Any = None, num_grad_steps: int | None = None, init_state: Any = None,
             **kw: Any) -> torch.Tensor:
    """``log_softmax(logits / temperature)[targets]`` [B, T] float32 over the full vocabulary."""
    kw.pop("kernels", None)
    _reject(kw)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    logits = forward(model, tokens, attention_mask, num_steps=num_steps, num_grad_steps=num_grad_steps,
                     init_state=init_state)
    targets = to_model(model, targets, torch.long)
    lp = torch.log_softmax(logits / temperature, dim=-1)
    return lp.gather(-1, targets[..., None]).squeeze(-1)


def generate(model: RecurrentLM, prompts: Any, sampling: Any, **kw: Any) -> Any:
    """Fixed- or adaptive-depth generation; see ``diptych.recurrent.generate``."""
    from diptych.recurrent.generate import generate as neutral_generate

    return neutral_generate(_Ops(model), prompts, sampling, **kw)


class _Ops:
    """The few primitives the backend-neutral generation loop needs, on numpy at the boundary."""

    def __init__(self, model: RecurrentLM) -> None:
        self.model, self.spec = model, model.spec

    @torch.no_grad()
    def prelude(self, tokens: np.ndarray, mask: np.ndarray) -> Context:
        return prelude(self.model, tokens, mask)

    @torch.no_grad()
    def init(self, ctx: Context, init_state: np.ndarray | None) -> torch.Tensor:
        return initial_state(self.model, ctx, init_state)

    @torch.no_grad()
    def step(self, ctx: Context, x: torch.Tensor) -> torch.Tensor:
        return core_step(self.model, ctx, x)

    @torch.no_grad()
    def logits_last(self, ctx: Context, x: torch.Tensor) -> np.ndarray:
        return readout(self.model, ctx, x)[:, -1].cpu().numpy()

    def latent_last(self, x: torch.Tensor) -> np.ndarray:
        return x[:, -1].float().cpu().numpy()

    def warm(self, x: torch.Tensor, prev_final: torch.Tensor) -> torch.Tensor:
        """Continuous CoT: every position restarts from its last final state, the new one from its left neighbour."""
        return torch.cat([prev_final, prev_final[:, -1:]], dim=1)[:, -x.shape[1]:]

    def select(self, keep: np.ndarray, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(to_model(self.model, keep, torch.bool)[:, None, None], old, new)

    def decoder(self, rows: int, capacity: int, steps: int) -> Any:
        """The KV-cached decode primitives (``diptych.backends.torch.recurrent_cache.Decoder``)."""
        from diptych.backends.torch.recurrent_cache import Decoder

        return Decoder(self.model, rows, capacity, steps)


def _check_tokens(spec: RecurrentSpec, tokens: torch.Tensor) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, time], got shape {tuple(tokens.shape)}.")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= spec.padded_vocab_size):
        raise ValueError(f"token ids must lie in [0, {spec.padded_vocab_size}), got range "
                         f"[{int(tokens.min())}, {int(tokens.max())}].")


def _reject(kw: dict[str, Any]) -> None:
    if kw:
        raise TypeError(f"Unexpected argument(s) for a recurrent model: {', '.join(sorted(kw))}.")


# -- a minimal truncated-backprop trainer (used by diptych.recipes; the trainers issue owns the general one)
class TruncatedTrainer:
    """AdamW on masked next-token NLL with truncated backprop; ``step`` returns the loss as a float."""

    def __init__(self, model: RecurrentLM, lr: float = 1e-3, weight_decay: float = 0.0, clip: float = 1.0) -> None:
        self.model, self.clip = model, clip
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))

    def step(self, tokens: np.ndarray, mask: np.ndarray, targets: np.ndarray, weights: np.ndarray, *,
             num_steps: int, num_grad_steps: int, init_state: np.ndarray | None = None) -> float:
        logits = forward_train(self.model, tokens, mask, num_steps=num_steps, num_grad_steps=num_grad_steps,
                               init_state=init_state)
        lp = torch.log_softmax(logits, -1).gather(-1, to_model(self.model, targets, torch.long)[..., None])[..., 0]
        w = to_model(self.model, weights, torch.float32)
        loss = -(lp * w).sum() / w.sum().clamp(min=1.0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return float(loss.detach())


def loss_grads(model: RecurrentLM, tokens: Any, mask: Any, targets: Any, weights: Any, *, num_steps: Any,
               num_grad_steps: int | None = None, init_state: Any = None) -> tuple[float, dict[str, np.ndarray]]:
    """``sum(weights * logprobs[targets])`` and its gradient per canonical name (parity and tests)."""
    model.zero_grad(set_to_none=True)
    lp = logprobs(model, tokens, mask, targets, num_steps=num_steps, num_grad_steps=num_grad_steps,
                  init_state=init_state)
    loss = (lp * to_model(model, weights, torch.float32)).sum()
    loss.backward()
    grads = {n: (p.grad.float().cpu().numpy().copy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32))
             for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads
