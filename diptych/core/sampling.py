"""Sampling, written once: the config, the token-choice rule, stopping, budget forcing, voting.

Both backends' samplers implement exactly the rule in :func:`choose_tokens` (the numpy
reference) so that, fed the same uniforms, JAX and torch draw the same tokens (DESIGN.md
rule 5). The rule, in this fixed order, on float32 logits of one step:

1. ``temperature == 0``: greedy ``argmax(logits)`` (first index on ties); no filters, no noise.
2. ``scaled = logits / temperature``.
3. top-k: drop tokens whose scaled logit is below the k-th largest (ties at the k-th are kept).
4. top-p: on ``softmax`` of what survives, sort descending; keep the smallest prefix whose mass
   before each token is ``< top_p``; then keep every token with probability >= the last kept one
   (so ties never depend on sort stability).
5. min-p: on ``softmax`` of what survives, drop tokens with ``p < min_p * max(p)``.
6. Gumbel-max: ``argmax(filtered + g)`` with ``g = -log(-log(u))``, ``u`` uniform in (0, 1).

Returned log-probs are always ``log_softmax(logits / temperature)`` over the FULL vocabulary at
the chosen token (``temperature`` 1 when greedy): the basis the trainer recomputes, never the
renormalised filtered distribution (NOTES.md, sampler/trainer mismatch).

Parity noise is the uniforms ``u`` of shape ``[N, max_new_tokens, vocab]`` from one numpy
stream (:func:`parity_noise`); row ``r`` of the batch uses ``noise[r, t]`` at step ``t``. It
is meant for tests (it is dense in the vocabulary).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

NEG_INF = float("-inf")


class SamplingError(ValueError):
    """Bad sampling settings or prompts, with what was wrong and how to fix it."""


@dataclass(frozen=True)
class SamplingConfig:
    """How to decode. ``eos_ids=None`` takes the model spec's EOS ids; ``()`` disables EOS.

    ``stop_sequences`` are token-id sequences matched against the completion only (a match that
    would need prompt tokens does not count); the matched tokens stay in the completion, as EOS does.
    ``pad_id=None`` takes the spec's ``pad_token_id``, else 0.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    n: int = 1
    eos_ids: tuple[int, ...] | None = None
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    pad_id: int | None = None

    def __post_init__(self) -> None:
        if int(self.max_new_tokens) < 1:
            raise SamplingError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise SamplingError(
                f"temperature must be >= 0 (0 means greedy), got {self.temperature}."
            )
        if int(self.top_k) < 0:
            raise SamplingError(f"top_k must be >= 0 (0 disables it), got {self.top_k}.")
        if not (0.0 < self.top_p <= 1.0):
            raise SamplingError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}.")
        if not (0.0 <= self.min_p < 1.0):
            raise SamplingError(f"min_p must be in [0, 1) (0 disables it), got {self.min_p}.")
        if int(self.n) < 1:
            raise SamplingError(f"n (samples per prompt) must be >= 1, got {self.n}.")
        stops = tuple(tuple(int(t) for t in s) for s in self.stop_sequences)
        if any(len(s) == 0 for s in stops):
            raise SamplingError("stop_sequences must not contain an empty sequence.")
        object.__setattr__(self, "stop_sequences", stops)
        if self.eos_ids is not None:
            eos = (self.eos_ids,) if isinstance(self.eos_ids, int) else self.eos_ids
            object.__setattr__(self, "eos_ids", tuple(int(e) for e in eos))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def resolve(self, spec: Any) -> SamplingConfig:
        """Fill ``eos_ids`` and ``pad_id`` from a model spec (the form samplers work with)."""
        eos = self.eos_ids if self.eos_ids is not None else tuple(getattr(spec, "eos_ids", ()) or ())
        pad = self.pad_id
        if pad is None:
            pad = getattr(spec, "pad_token_id", None)
            pad = 0 if pad is None else int(pad)
        return replace(self, eos_ids=tuple(eos), pad_id=int(pad))


@dataclass
class Rollout:
    """What a sampler returns; all numpy. Row ``i * n + j`` is sample ``j`` of prompt ``i``."""

    prompt_tokens: np.ndarray  # [N, P] int32, left-padded with pad_id
    prompt_mask: np.ndarray  # [N, P] int32
    completion_tokens: np.ndarray  # [N, max_new] int32, right-padded with pad_id
    completion_mask: np.ndarray  # [N, max_new] int32, 1 up to and including the stop token
    logprobs: np.ndarray  # [N, max_new] float32, 0 where the mask is 0
    lengths: np.ndarray  # [N] int32, completion_mask.sum(1)
    truncated: np.ndarray  # [N] bool, True when max_new_tokens ran out before EOS / a stop sequence
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> np.ndarray:
        """Prompt and completion side by side ``[N, P + max_new]`` (what the trainer scores)."""
        return np.concatenate([self.prompt_tokens, self.completion_tokens], axis=1)

    @property
    def attention_mask(self) -> np.ndarray:
        return np.concatenate([self.prompt_mask, self.completion_mask], axis=1)

    def completions(self) -> list[list[int]]:
        """The generated ids of each row, without padding."""
        return [row[:n].tolist() for row, n in zip(self.completion_tokens, self.lengths)]


# -- input checks and layout ----------------------------------------------------------------------
def model_context(spec: Any) -> int:
    """The longest sequence the model serves: ``max_position_embeddings``, unbounded for dynamic-NTK RoPE (its base
    grows with the sequence, which is what the scaling is for) and for specs without a position limit."""
    rope = getattr(spec, "rope", None)
    if callable(rope) and getattr(rope(), "dynamic", False):
        return 1 << 30
    return int(getattr(spec, "max_position_embeddings", 1 << 30))


def prepare_prompts(
    prompts: Sequence[Sequence[int]], sampling: SamplingConfig, spec: Any, bucket: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validate prompts and lay them out left-padded and repeated ``n`` times (``[N, P]`` int32).

    ``bucket`` rounds the width up (to a power of two, at least ``bucket``) so that a compiled
    sampler sees few distinct shapes; callers trim it back with :func:`trim_prompt`.
    """
    if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
        raise SamplingError("prompts must be a non-empty list of token-id lists; got an empty list.")
    rows = [[int(t) for t in p] for p in prompts]
    vocab = int(spec.vocab_size)
    for i, p in enumerate(rows):
        if not p:
            raise SamplingError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS).")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise SamplingError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {vocab}).")
    longest = max(len(p) for p in rows)
    context = model_context(spec)
    if longest > context:
        raise SamplingError(
            f"prompt of {longest} tokens is longer than the model context ({context} = max_position_embeddings); "
            "shorten or truncate the prompt."
        )
    if longest + sampling.max_new_tokens > context:
        raise SamplingError(
            f"longest prompt ({longest}) + max_new_tokens ({sampling.max_new_tokens}) exceeds the model context "
            f"({context}); lower max_new_tokens to at most {context - longest}."
        )
    width = longest
    if bucket:
        width = max(bucket, 1 << (longest - 1).bit_length())
        width = min(width, context)
        width = max(width, longest)
    pad = int(sampling.pad_id or 0)
    tokens = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, p in enumerate(rows):
        tokens[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    n = int(sampling.n)
    return np.repeat(tokens, n, axis=0), np.repeat(mask, n, axis=0)


def trim_prompt(tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop bucket columns that are padding in every row."""
    width = int(mask.sum(1).max())
    return tokens[:, tokens.shape[1] - width:], mask[:, mask.shape[1] - width:]


UNIFORM_LO, UNIFORM_HI = 1e-12, 1 - 2**-24
"""Where uniforms are clipped before ``-log(-log(u))``: the parity noise here and the backends' own draws."""


def parity_noise(rows: int, max_new_tokens: int, vocab_size: int, seed: int) -> np.ndarray:
    """Uniforms in (0, 1), float32 ``[rows, max_new_tokens, vocab]``, from one numpy stream."""
    u = np.random.default_rng(seed).random((rows, max_new_tokens, vocab_size), dtype=np.float32)
    return np.clip(u, np.float32(UNIFORM_LO), np.float32(UNIFORM_HI)).astype(np.float32)


def gumbel_from_uniform(u: np.ndarray) -> np.ndarray:
    """``g = -log(-log(u))`` in float32 on the host, so both backends receive identical noise."""
    u = np.asarray(u, np.float32)
    if u.size and (u.min() <= 0 or u.max() >= 1):
        raise SamplingError("parity noise must be uniforms strictly inside (0, 1); use sampling.parity_noise().")
    return (-np.log(-np.log(u))).astype(np.float32)


def check_noise(noise: np.ndarray, rows: int, sampling: SamplingConfig, vocab: int) -> np.ndarray:
    noise = np.asarray(noise, np.float32)
    want = (rows, sampling.max_new_tokens, vocab)
    if noise.shape != want:
        raise SamplingError(
            f"noise has shape {noise.shape}; parity mode needs uniforms of shape [N, max_new_tokens, vocab] = {want} "
            f"(N = len(prompts) * n). Make it with diptych.core.sampling.parity_noise(*{want}, seed)."
        )
    return noise


def parity_gumbel(noise: np.ndarray | None, rows: int, sampling: SamplingConfig, vocab: int) -> np.ndarray | None:
    """The Gumbel noise of parity mode (checked uniforms -> ``g``), or None: no noise given, or greedy
    (which draws nothing). Backends move it onto their device and use it instead of their own draws."""
    if noise is None or sampling.greedy:
        return None
    return gumbel_from_uniform(check_noise(noise, rows, sampling, vocab))


def finished_rollout(prompt_tokens: np.ndarray, prompt_mask: np.ndarray, completion_tokens: Any,
                     completion_mask: Any, logprobs: Any, done: Any) -> Rollout:
    """A sampler's numpy results as a :class:`Rollout`: bucket columns trimmed, lengths counted, and
    rows that never stopped marked truncated."""
    ptok, pmask = trim_prompt(prompt_tokens, prompt_mask)
    cm = np.asarray(completion_mask, np.int32)
    return Rollout(
        prompt_tokens=ptok, prompt_mask=pmask, completion_tokens=np.asarray(completion_tokens, np.int32),
        completion_mask=cm, logprobs=np.asarray(logprobs, np.float32), lengths=cm.sum(1).astype(np.int32),
        truncated=~np.asarray(done, bool),
    )


# -- the token-choice rule (numpy reference) -------------------------------------------------------
def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(-1, keepdims=True)


def filter_logits(logits: np.ndarray, sampling: SamplingConfig) -> np.ndarray:
    """Temperature, then top-k, top-p, min-p (module docstring); removed tokens become -inf."""
    x = np.asarray(logits, np.float32) / np.float32(sampling.temperature)
    if sampling.top_k and sampling.top_k < x.shape[-1]:
        kth = -np.sort(-x, axis=-1)[..., sampling.top_k - 1: sampling.top_k]
        x = np.where(x < kth, np.float32(NEG_INF), x)
    if sampling.top_p < 1.0:
        p = _softmax(x)
        ps = -np.sort(-p, axis=-1)
        before = np.cumsum(ps, axis=-1) - ps
        keep_n = np.sum(before < np.float32(sampling.top_p), axis=-1, keepdims=True)
        cutoff = np.take_along_axis(ps, keep_n - 1, axis=-1)
        x = np.where(p < cutoff, np.float32(NEG_INF), x)
    if sampling.min_p > 0.0:
        p = _softmax(x)
        x = np.where(p < np.float32(sampling.min_p) * p.max(-1, keepdims=True), np.float32(NEG_INF), x)
    return x.astype(np.float32)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    m = x.max(-1, keepdims=True)
    return (x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))).astype(np.float32)


def choose_tokens(
    logits: np.ndarray,
    sampling: SamplingConfig,
    gumbel: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The rule both backends implement: ``([B] int32 tokens, [B] float32 full-vocab log-probs)``."""
    logits = np.asarray(logits, np.float32)
    if sampling.greedy:
        tok = np.argmax(logits, axis=-1)
        lp = log_softmax(logits)
    else:
        if gumbel is None:
            u = (rng or np.random.default_rng()).random(logits.shape, dtype=np.float32)
            gumbel = gumbel_from_uniform(np.clip(u, np.float32(1e-12), np.float32(1 - 2**-24)))
        tok = np.argmax(filter_logits(logits, sampling) + gumbel, axis=-1)
        lp = log_softmax(logits / np.float32(sampling.temperature))
    return tok.astype(np.int32), np.take_along_axis(lp, tok[..., None], -1)[..., 0].astype(np.float32)


def stop_matches(window: np.ndarray, generated: int, stops: Sequence[Sequence[int]]) -> np.ndarray:
    """Rows whose last generated tokens end with one of ``stops``; ``window`` = last L tokens ``[B, L]``."""
    hit = np.zeros(window.shape[0], bool)
    for s in stops:
        if len(s) <= generated and len(s) <= window.shape[1]:
            hit |= np.all(window[:, window.shape[1] - len(s):] == np.asarray(s), axis=1)
    return hit


def reference_generate(
    next_logits: Callable[[list[list[int]]], np.ndarray],
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    spec: Any,
    *,
    noise: np.ndarray | None = None,
    seed: int | None = None,
) -> Rollout:
    """The sampler's contract as a plain host loop over ``next_logits(sequences) -> [B, V]``.

    No cache, O(T^2): a specification to test samplers against and the engine for scripted
    (fake) models in tests of stopping and budget forcing.
    """
    sampling = sampling.resolve(spec)
    ptok, pmask = prepare_prompts(prompts, sampling, spec)
    rows, steps, pad = ptok.shape[0], sampling.max_new_tokens, sampling.pad_id
    gumbel = None if noise is None else gumbel_from_uniform(check_noise(noise, rows, sampling, spec.vocab_size))
    rng = np.random.default_rng(seed)
    seqs = [list(t[m == 1]) for t, m in zip(ptok, pmask)]
    out = np.full((rows, steps), pad, np.int32)
    lps = np.zeros((rows, steps), np.float32)
    cmask = np.zeros((rows, steps), np.int32)
    done = np.zeros(rows, bool)
    eos = np.asarray(sampling.eos_ids or (-1,))
    for t in range(steps):
        logits = np.asarray(next_logits(seqs), np.float32)
        tok, lp = choose_tokens(logits, sampling, None if gumbel is None else gumbel[:, t], rng)
        tok = np.where(done, pad, tok)
        out[:, t], lps[:, t], cmask[:, t] = tok, np.where(done, 0, lp), ~done
        for r in np.flatnonzero(~done):
            seqs[r].append(int(tok[r]))
        finished = np.isin(tok, eos) | stop_matches(out[:, : t + 1], t + 1, sampling.stop_sequences)
        done |= finished & ~done
        if done.all():
            break
    return Rollout(ptok, pmask, out, cmask, lps, cmask.sum(1).astype(np.int32), ~done)


# -- budget forcing (s1) ----------------------------------------------------------------------------
@dataclass(frozen=True)
class BudgetForcing:
    """s1's test-time budget control, in token ids so it is tokenizer-agnostic.

    Thinking ends when the model emits ``end_think_ids`` (or EOS). Below ``min_thinking_tokens``
    the end is suppressed (marker / EOS dropped) and ``continuation_ids`` ("Wait") appended, at
    most ``max_waits`` times. At ``max_thinking_tokens`` the policy appends ``end_think_ids`` and
    ``answer_prefix_ids`` ("Final Answer:"). The answer then runs to EOS or ``max_answer_tokens``.
    """

    end_think_ids: tuple[int, ...]
    min_thinking_tokens: int = 0
    max_thinking_tokens: int = 256
    continuation_ids: tuple[int, ...] = ()
    max_waits: int = 1
    answer_prefix_ids: tuple[int, ...] = ()
    max_answer_tokens: int = 64

    def __post_init__(self) -> None:
        if not self.end_think_ids:
            raise SamplingError("BudgetForcing.end_think_ids must name the end-of-thinking marker's token ids.")
        if self.min_thinking_tokens < 0 or self.max_thinking_tokens < 1:
            raise SamplingError("min_thinking_tokens must be >= 0 and max_thinking_tokens >= 1.")
        if self.min_thinking_tokens > self.max_thinking_tokens:
            raise SamplingError(
                f"min_thinking_tokens ({self.min_thinking_tokens}) exceeds max_thinking_tokens "
                f"({self.max_thinking_tokens})."
            )
        if self.min_thinking_tokens > 0 and not self.continuation_ids and self.max_waits > 0:
            raise SamplingError("a minimum thinking budget needs continuation_ids (e.g. the ids of 'Wait').")
        if self.max_answer_tokens < 1:
            raise SamplingError("max_answer_tokens must be >= 1.")


@dataclass
class ForcedCompletion:
    """One row's budget-forced completion; ``inserted`` marks tokens the policy wrote, not the model."""

    tokens: list[int]
    inserted: list[bool]
    thinking_tokens: int
    waits: int
    forced_end: bool
    truncated: bool


def budget_forced_generate(
    generate: Callable[[list[list[int]], SamplingConfig], Rollout],
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    policy: BudgetForcing,
) -> list[ForcedCompletion]:
    """Run ``generate`` (any backend's, or :func:`reference_generate` bound to a model) in segments.

    A host-side loop: each round re-prompts the still-thinking rows with prompt + completion so
    far, so it works unchanged on every backend. ``sampling.eos_ids`` must be resolved (not None).
    Rows are repeated ``sampling.n`` times like a Rollout.
    """
    eos = set(sampling.eos_ids or ())
    marker = list(policy.end_think_ids)
    base = replace(sampling, n=1)
    rows = [list(map(int, p)) for p in prompts for _ in range(sampling.n)]
    out = [ForcedCompletion([], [], 0, 0, False, False) for _ in rows]
    thinking = list(range(len(rows)))

    def extend(r: int, ids: Sequence[int], inserted: bool) -> None:
        out[r].tokens.extend(int(t) for t in ids)
        out[r].inserted.extend([inserted] * len(ids))

    answering: list[int] = []
    while thinking:
        budget = max(policy.max_thinking_tokens - out[r].thinking_tokens for r in thinking)
        seg_cfg = replace(base, max_new_tokens=budget, stop_sequences=(*base.stop_sequences, tuple(marker)))
        ro = generate([rows[r] + out[r].tokens for r in thinking], seg_cfg)
        still: list[int] = []
        for i, r in enumerate(thinking):
            left = policy.max_thinking_tokens - out[r].thinking_tokens
            seg = ro.completions()[i][:left]
            ended_marker = len(seg) >= len(marker) and seg[-len(marker):] == marker
            ended_eos = bool(seg) and seg[-1] in eos and not ended_marker
            spent = not (ended_marker or ended_eos) and len(seg) >= left
            body = seg[: len(seg) - len(marker)] if ended_marker else (seg[:-1] if ended_eos else seg)
            extend(r, body, False)
            out[r].thinking_tokens += len(body)
            if (ended_marker or ended_eos) and out[r].thinking_tokens < policy.min_thinking_tokens \
                    and out[r].waits < policy.max_waits:
                extend(r, policy.continuation_ids, True)
                out[r].thinking_tokens += len(policy.continuation_ids)
                out[r].waits += 1
                if out[r].thinking_tokens >= policy.max_thinking_tokens:
                    extend(r, marker + list(policy.answer_prefix_ids), True)
                    out[r].forced_end = True
                    answering.append(r)
                else:
                    still.append(r)
            elif ended_marker:
                extend(r, marker, False)
                answering.append(r)
            elif ended_eos:
                extend(r, seg[-1:], False)
            elif spent:
                extend(r, marker + list(policy.answer_prefix_ids), True)
                out[r].forced_end = True
                answering.append(r)
            # else: a caller's stop sequence ended the row; it is finished as generated.
        thinking = still
    if answering:
        ans_cfg = replace(base, max_new_tokens=policy.max_answer_tokens)
        ro = generate([rows[r] + out[r].tokens for r in answering], ans_cfg)
        for i, r in enumerate(answering):
            extend(r, ro.completions()[i], False)
            out[r].truncated = bool(ro.truncated[i])
    return out


# -- voting and pass@k ------------------------------------------------------------------------------
def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent extracted answer (None = unparseable, ignored); ties go to the earliest."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def majority_vote_groups(answers: Sequence[str | None], n: int) -> list[str | None]:
    """Majority vote over each contiguous group of ``n`` samples (the Rollout row order)."""
    if n < 1 or len(answers) % n:
        raise SamplingError(f"{len(answers)} answers do not split into groups of n={n}.")
    return [majority_vote(answers[i: i + n]) for i in range(0, len(answers), n)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): ``1 - C(n - c, k) / C(n, k)`` for c correct of n samples."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise SamplingError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(correct: np.ndarray, k: int) -> float:
    """Mean pass@k over prompts; ``correct`` is bool ``[num_prompts, n]``."""
    correct = np.asarray(correct, bool)
    if correct.ndim != 2:
        raise SamplingError(f"correct must be [num_prompts, n], got shape {correct.shape}.")
    return float(np.mean([pass_at_k(correct.shape[1], int(c), k) for c in correct.sum(1)]))
