"""Batched KV-cached generation in torch: prefill once, then one cached step per token.

The token-choice rule is :mod:`diptych.core.sampling`'s, translated line for line (temperature,
top-k, top-p, min-p, Gumbel-max), so given the same parity noise this draws the tokens the
numpy reference and the JAX sampler draw. ``diptych.backends.jax.sampler`` is the same text
in JAX (there the decode loop is a ``lax.while_loop``; here a Python loop under
``torch.inference_mode`` that exits as soon as every row has stopped).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diptych.backends.torch import model as M
from diptych.core.sampling import (
    NEG_INF,
    UNIFORM_HI,
    UNIFORM_LO,
    Rollout,
    SamplingConfig,
    finished_rollout,
    parity_gumbel,
    prepare_prompts,
)


def filter_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p on float32 ``[B, V]``; removed tokens become -inf."""
    return _filter_scaled(logits.float() / sampling.temperature, sampling)


def _filter_scaled(x: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """:func:`filter_logits` after the temperature (the decode loop divides once for the filters and the log-probs)."""
    if sampling.top_k and sampling.top_k < x.shape[-1]:
        kth = torch.topk(x, sampling.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, NEG_INF)
    if sampling.top_p < 1.0:
        p = torch.softmax(x, dim=-1)
        ps = torch.sort(p, dim=-1, descending=True).values
        before = torch.cumsum(ps, dim=-1) - ps
        keep_n = (before < sampling.top_p).sum(-1, keepdim=True)
        cutoff = torch.gather(ps, -1, keep_n - 1)
        x = x.masked_fill(p < cutoff, NEG_INF)
    if sampling.min_p > 0.0:
        p = torch.softmax(x, dim=-1)
        x = x.masked_fill(p < sampling.min_p * p.amax(-1, keepdim=True), NEG_INF)
    return x


def choose_tokens(logits: torch.Tensor, sampling: SamplingConfig, gumbel: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [B], full-vocab log-probs [B])``; ``gumbel`` is unused when greedy."""
    logits = logits.float()
    if sampling.greedy:
        tok = torch.argmax(logits, dim=-1)
        lp = torch.log_softmax(logits, dim=-1)
    else:
        tok = torch.argmax(filter_logits(logits, sampling) + gumbel, dim=-1)
        lp = torch.log_softmax(logits / sampling.temperature, dim=-1)
    return tok, torch.gather(lp, -1, tok[:, None])[:, 0]


def _stop_hit(out: torch.Tensor, t: int, stops: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Rows whose completion ``out[:t+1]`` (steps first: ``[steps, B, 1]``) ends with one of ``stops``."""
    hit = torch.zeros(out.shape[1], dtype=torch.bool, device=out.device)
    for s in stops:
        if len(s) <= t + 1:
            hit |= (out[t + 1 - len(s): t + 1, :, 0] == s[:, None]).all(0)
    return hit[:, None]


def decode_step(model: M.Decoder, tok: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor,
                cache: M.KVCache, write_index: int) -> torch.Tensor:
    """One new token per row through the decoder's layers (called as modules: FSDP and tensor-parallel hooks
    fire, LoRA and NF4 linears run as themselves), minus :func:`model.forward_cached`'s per-call work:
    ``cos`` / ``sin`` come precomputed (``[B, 1, 1, head_dim]``, :func:`model.rope_decode`) and ``allowed``
    ``[B, 1, >= write_index + 1]`` is a view of the caller's mask. Attends over the slots filled so far only
    (``write_index + 1``): views of the static cache, so the new k/v land in it. Returns next-token logits
    ``[B, V]`` float32.
    """
    span = write_index + 1
    allowed = allowed[:, :, :span]
    x = model.model.embed_tokens(tok)
    for layer, k, v in zip(model.model.layers, cache.k, cache.v, strict=True):
        x = layer(x, cos, sin, allowed, (k[:, :, :span], v[:, :, :span], write_index))
    hidden = model.model.norm(x)
    return torch.nn.functional.linear(hidden[:, -1], M.lm_head_weight(model)).float()


STOP_CHECK_EVERY = 8
"""Decode steps between host reads of "has every row stopped?" on an accelerator (every step on CPU)."""


def _stop_check_every(device: torch.device) -> int:
    return 1 if device.type == "cpu" else STOP_CHECK_EVERY


GUMBEL_BLOCK_BYTES = 32 << 20
"""Seeded noise is drawn for several steps at once, up to this many bytes (CPU only: there one draw of
``[k, B, V]`` equals k successive draws of ``[B, V]``, so the tokens do not depend on the block)."""


class _Noise:
    """Per-step Gumbel noise ``[B, V]``: the parity noise's step ``t``, or ``-log(-log(u))`` of uniforms from
    ``gen`` in the order a draw of ``[B, V]`` per step would give them."""

    def __init__(self, gumbel: torch.Tensor | None, gen: torch.Generator, shape: tuple[int, int], steps: int,
                 device: torch.device) -> None:
        self.gumbel, self.gen, self.shape, self.device = gumbel, gen, shape, device
        per_step = 4 * shape[0] * shape[1]
        self.block = 1 if device.type != "cpu" else max(1, min(steps, GUMBEL_BLOCK_BYTES // max(per_step, 1)))
        self.start, self.buf = 0, None

    def __call__(self, t: int) -> torch.Tensor:
        if self.gumbel is not None:
            return self.gumbel[:, t]
        if self.buf is None or t >= self.start + self.buf.shape[0]:
            u = torch.rand((self.block, *self.shape), generator=self.gen, device=self.device)
            self.buf = u.clamp_(UNIFORM_LO, UNIFORM_HI).log_().neg_().log_().neg_()
            self.start = t
        return self.buf[t - self.start]


def _rope_steps(model: M.Decoder, next_pos: torch.Tensor, steps: int, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cos / sin ``[steps, B, 1, 1, head_dim]`` (:func:`model.rope_decode`'s form) for every decode position at once;
    None for dynamic RoPE, whose frequencies follow each step's largest position (computed per step, as
    transformers does)."""
    if model.spec.rope().dynamic:
        return None
    positions = next_pos + torch.arange(steps, device=next_pos.device)  # [B, steps]
    cos, sin = M.rope_cos_sin(positions, model.spec, dtype)
    cos, sin = M.rope_decode(cos.transpose(0, 1)[:, :, None], sin.transpose(0, 1)[:, :, None])
    return cos.contiguous(), sin.contiguous()


def generate(
    model: M.Decoder,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    *,
    noise: np.ndarray | None = None,
    seed: int | None = None,
    compile: bool = False,
) -> Rollout:
    """Sample ``sampling.n`` completions per prompt; see :class:`diptych.core.sampling.Rollout`.

    ``noise``: parity-mode uniforms ``[len(prompts) * n, max_new_tokens, vocab]``; otherwise
    Gumbel noise comes from a ``torch.Generator`` seeded with ``seed`` (random when None).
    ``compile`` (torch only, so not a field of the neutral config) wraps the decode step in
    ``torch.compile``.

    The loop is kept lean because at small models its Python and allocation cost per token is the
    cost: RoPE tables for every step are built once, the attention mask is one buffer updated in place,
    tokens and log-probs are written straight into their outputs, and without EOS ids or stop
    sequences no per-row stop bookkeeping (nor a host read of it) happens at all.
    """
    spec = model.spec
    sampling = sampling.resolve(spec)
    ptok_np, pmask_np = prepare_prompts(prompts, sampling, spec)
    rows, plen = ptok_np.shape
    steps, pad = sampling.max_new_tokens, sampling.pad_id
    device = M.lm_head_weight(model).device
    gumbel = parity_gumbel(noise, rows, sampling, spec.vocab_size)
    gumbel = None if gumbel is None else torch.from_numpy(gumbel).to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) if seed is not None else int(torch.seed()))
    step_fn = torch.compile(decode_step, dynamic=True) if compile else decode_step
    track = bool(sampling.eos_ids) or bool(sampling.stop_sequences)  # else no row can stop early
    # reading ``done`` on the host is free on CPU and a device sync elsewhere; a late exit only decodes rows that
    # are already finished (pad tokens, zero mask and log-probs, as the buffers hold), so the result is the same
    stop_check = _stop_check_every(device)
    window = spec.sliding_window

    with torch.inference_mode():
        ptok = torch.from_numpy(ptok_np).to(device=device, dtype=torch.long)
        pmask = torch.from_numpy(pmask_np).to(device)
        cache = M.init_cache(model, rows, plen + steps)
        key_mask = torch.zeros(rows, plen + steps, dtype=torch.bool, device=device)
        key_mask[:, :plen] = pmask != 0
        positions = (pmask.long().cumsum(-1) - 1).clamp(min=0)
        logits, cache = M.forward_cached(model, ptok, positions, cache, 0, key_mask)
        logits = logits[:, -1]
        next_pos = pmask.long().sum(-1, keepdim=True)
        dtype = model.model.embed_tokens.weight.dtype
        rope = _rope_steps(model, next_pos, steps, dtype)
        draw = None if sampling.greedy else _Noise(gumbel, gen, tuple(logits.shape), steps, device)
        allowed = key_mask.clone()  # the decode steps' mask: key_mask and, for Mistral, the window
        if window is not None:
            allowed[:, : max(0, plen - window + 1)] = False
        allowed3 = allowed[:, None]

        # steps first, so each step writes one contiguous [B, 1] slice
        out = torch.full((steps, rows, 1), pad, dtype=torch.long, device=device)
        lps = torch.zeros(steps, rows, 1, dtype=torch.float32, device=device)
        if track:
            eos = torch.tensor(sampling.eos_ids or (-1,), dtype=torch.long, device=device)
            stops = tuple(torch.tensor(s, dtype=torch.long, device=device) for s in sampling.stop_sequences)
            alive = torch.zeros(steps, rows, 1, dtype=torch.bool, device=device)
            done = torch.zeros(rows, 1, dtype=torch.bool, device=device)
        for t in range(steps):
            tok = out[t]
            if sampling.greedy:
                torch.argmax(logits, dim=-1, keepdim=True, out=tok)
                lp = torch.log_softmax(logits, dim=-1)
            else:
                scaled = logits / sampling.temperature
                torch.argmax(_filter_scaled(scaled, sampling) + draw(t), dim=-1, keepdim=True, out=tok)
                lp = torch.log_softmax(scaled, dim=-1)
            torch.gather(lp, -1, tok, out=lps[t])
            if track:
                tok.masked_fill_(done, pad)
                lps[t].masked_fill_(done, 0.0)
                torch.logical_not(done, out=alive[t])
                done |= torch.isin(tok, eos)
                if stops:
                    done |= _stop_hit(out, t, stops)
                if t == steps - 1 or (t % stop_check == stop_check - 1 and bool(done.all())):
                    break
            elif t == steps - 1:
                break
            write = plen + t
            allowed[:, write] = True
            if window is not None and write - window >= 0:
                allowed[:, write - window] = False
            if rope is None:
                cos, sin = M.rope_decode(*M.rope_cos_sin(next_pos + t, spec, dtype))
            else:
                cos, sin = rope[0][t], rope[1][t]
            logits = step_fn(model, tok, cos, sin, allowed3, cache, write)

    cmask = alive[:, :, 0].T.int() if track else torch.ones(rows, steps, dtype=torch.int32)
    finished = done[:, 0] if track else torch.zeros(rows, dtype=torch.bool)
    return finished_rollout(ptok_np, pmask_np, out[:, :, 0].T.cpu().numpy(), cmask.cpu().numpy(),
                            lps[:, :, 0].T.cpu().numpy(), finished.cpu().numpy())
