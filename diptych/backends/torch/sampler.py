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
    x = logits.float() / sampling.temperature
    neg = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
    if sampling.top_k and sampling.top_k < x.shape[-1]:
        kth = torch.topk(x, sampling.top_k, dim=-1).values[..., -1:]
        x = torch.where(x < kth, neg, x)
    if sampling.top_p < 1.0:
        p = torch.softmax(x, dim=-1)
        ps = torch.sort(p, dim=-1, descending=True).values
        before = torch.cumsum(ps, dim=-1) - ps
        keep_n = (before < sampling.top_p).sum(-1, keepdim=True)
        cutoff = torch.gather(ps, -1, keep_n - 1)
        x = torch.where(p < cutoff, neg, x)
    if sampling.min_p > 0.0:
        p = torch.softmax(x, dim=-1)
        x = torch.where(p < sampling.min_p * p.amax(-1, keepdim=True), neg, x)
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


def _stop_hit(out: torch.Tensor, t: int, stops: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """Rows whose completion ``out[:, :t+1]`` ends with one of ``stops``."""
    hit = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
    for s in stops:
        if len(s) <= t + 1:
            tail = out[:, t + 1 - len(s): t + 1]
            hit |= (tail == torch.tensor(s, dtype=out.dtype, device=out.device)).all(-1)
    return hit


def decode_step(model: M.Decoder, tok: torch.Tensor, pos: torch.Tensor, cache: M.KVCache, write_index: int,
                key_mask: torch.Tensor) -> torch.Tensor:
    """:func:`model.forward_cached` for one new token per row, minus its input conversions and checks.

    Attends over the slots filled so far only (``write_index + 1``): a view of the static cache,
    so the new k/v still land in it. Returns next-token logits ``[B, V]`` float32.
    """
    span = write_index + 1
    window = M.KVCache(cache.k[:, :, :, :span], cache.v[:, :, :, :span])
    allowed = key_mask[:, None, :span]
    if model.spec.sliding_window is not None:  # Mistral: only the last sliding_window slots
        allowed = allowed & (torch.arange(span, device=allowed.device) > write_index - model.spec.sliding_window)
    hidden = model.run(tok, pos, allowed, window, write_index)
    return torch.nn.functional.linear(hidden[:, -1], M.lm_head_weight(model)).float()


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
    eos = torch.tensor(sampling.eos_ids or (-1,), dtype=torch.long, device=device)

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

        out = torch.full((rows, steps), pad, dtype=torch.long, device=device)
        lps = torch.zeros(rows, steps, dtype=torch.float32, device=device)
        cmask = torch.zeros(rows, steps, dtype=torch.int32, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        for t in range(steps):
            g = None
            if not sampling.greedy:
                if gumbel is not None:
                    g = gumbel[:, t]
                else:
                    u = torch.rand(logits.shape, generator=gen, device=device).clamp_(UNIFORM_LO, UNIFORM_HI)
                    g = -torch.log(-torch.log(u))
            tok, lp = choose_tokens(logits, sampling, g)
            tok = torch.where(done, pad, tok)
            out[:, t] = tok
            lps[:, t] = torch.where(done, 0.0, lp)
            cmask[:, t] = (~done).int()
            done = done | torch.isin(tok, eos) | _stop_hit(out, t, sampling.stop_sequences)
            if t == steps - 1 or bool(done.all()):
                break
            key_mask[:, plen + t] = True
            logits = step_fn(model, tok[:, None], next_pos + t, cache, plen + t, key_mask)

    return finished_rollout(ptok_np, pmask_np, out.cpu().numpy(), cmask.cpu().numpy(), lps.cpu().numpy(),
                            done.cpu().numpy())

