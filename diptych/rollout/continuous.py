"""A continuous-batching native sampler that takes new weights between decode steps (issue 20).

Synchronous GRPO samples a batch, waits for its longest row, then trains. An asynchronous generator
(Magistral) instead keeps a fixed number of rows busy: a finished row leaves at once and a waiting
prompt takes its slot, and new weights arrive between two decode steps without restarting the rows in
flight. So one completion may span several policy versions; every token records the version that
produced it and its behaviour log-prob, which is what the trainer's off-policy correction needs.

The rows in flight keep the K/V their earlier tokens were computed with (Magistral's choice): after a
swap to version 1, a token's log-prob comes from version-1 weights attending to a prefix whose K/V
version 0 wrote. ``recompute_kv=True`` instead rewrites every in-flight row's K/V with the new weights
at the swap, so later tokens are exactly what a clean version-1 forward gives.

This module is the backend-neutral driver: bookkeeping, the token-choice rule of
:mod:`diptych.core.sampling` (applied on the host, with one ``numpy`` Generator per sampler) and
stopping. The per-backend part (``diptych.backends.<name>.continuous.SlotDecoder``: a KV cache with a
per-row write position, prefill of one row, one decode step of every row, weight loading) is imported
by name so no framework is imported here. Every call holds one lock, so ``update_weights`` from another
thread lands between two steps.
"""

from __future__ import annotations

import importlib
import threading
from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diptych.core.backend import get_backend
from diptych.core.model_types import is_recurrent
from diptych.core.sampling import SamplingConfig, SamplingError, choose_tokens, model_context, stop_matches


@dataclass
class Finished:
    """One finished request: its completion, the behaviour log-probs and the weight version of every token."""

    request_id: Hashable
    prompt_ids: list[int]
    tokens: np.ndarray
    """int64 ``[n]`` completion ids (EOS or the stop sequence included when produced)."""
    logprobs: np.ndarray
    """float32 ``[n]``: full-vocabulary ``log_softmax(logits / T)`` of each chosen token (the trainer's basis)."""
    versions: np.ndarray
    """int64 ``[n]``: the weight version that produced each token."""
    truncated: bool
    """True when ``max_new_tokens`` ran out before EOS or a stop sequence."""


@dataclass
class _Row:
    request_id: Hashable
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    versions: list[int]


class ContinuousSampler:
    """``slots`` rows decoding side by side; prompts queue with :meth:`submit` and leave through :meth:`step`.

    Each :meth:`step` gives every busy row exactly one token: rows already in flight get it from one
    batched decode step, rows admitted in this step (waiting prompts, into free slots, in submission
    order) get their first token from their prefill; repeats of one prompt admitted together (GRPO's
    group) share one prefill. ``sampling.n`` must be 1 (submit a prompt ``n`` times, under distinct ids,
    for ``n`` samples). JAX compiles one decode program per ``(slots, max_prompt_length + max_new_tokens)``,
    one prefill program (two with ``recompute_kv``) and one row copy; nothing per admission, exit or swap.

    With dynamic-NTK RoPE the rotary base follows the largest position in each forward, so there (as in
    any batched sampler, transformers' included) a row's tokens can depend on its neighbours; every other
    RoPE type keeps rows independent.
    """

    def __init__(self, backend: Any, model: Any, sampling: SamplingConfig, *, slots: int, max_prompt_length: int,
                 seed: int = 0, version: int = 0, recompute_kv: bool = False) -> None:
        if isinstance(backend, str):
            backend = get_backend(backend)
        if is_recurrent(model):
            raise SamplingError(
                "ContinuousSampler serves decoder models only; sample a recurrent-depth model with the synchronous "
                "native sampler (backend.generate, the 'native' rollout engine).")
        if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < 1:
            raise SamplingError(f"slots (rows decoded side by side) must be an integer >= 1, got {slots!r}.")
        if isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, (int, np.integer)) \
                or max_prompt_length < 1:
            raise SamplingError(f"max_prompt_length must be an integer >= 1, got {max_prompt_length!r}.")
        _check_version(version)
        spec = model.spec
        self.sampling = sampling.resolve(spec)
        if self.sampling.n != 1:
            raise SamplingError(f"ContinuousSampler draws one completion per request; got sampling.n={sampling.n}. "
                                "Submit the prompt n times under distinct request ids instead.")
        context = model_context(spec)
        steps = self.sampling.max_new_tokens
        if max_prompt_length + steps > context:
            raise SamplingError(
                f"max_prompt_length ({max_prompt_length}) + max_new_tokens ({steps}) exceeds the model context "
                f"({context} = max_position_embeddings); lower one of them.")
        self.backend, self.spec = backend, spec
        self.slots, self.max_prompt_length = int(slots), int(max_prompt_length)
        self.recompute_kv = bool(recompute_kv)
        # Tokens a row ever holds in its cache: the prompt and every completion token but the last.
        self._max_len = self.max_prompt_length + steps - 1
        module = importlib.import_module(f"{backend.package}.continuous")
        self._decoder = module.SlotDecoder(model, self.slots, self._max_len)
        self._rng = np.random.default_rng(seed)
        self._version = int(version)
        self._eos = np.asarray(self.sampling.eos_ids or (-1,), np.int64)
        self._rows: list[_Row | None] = [None] * self.slots
        self._lengths = np.zeros(self.slots, np.int32)  # tokens in each row's cache
        self._pending = np.zeros(self.slots, np.int32)  # each busy row's last token, fed at the next decode
        self._waiting: deque[tuple[Hashable, list[int]]] = deque()
        self._known: set[Hashable] = set()
        self._lock = threading.Lock()

    # -- state ----------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The weight version the next token is sampled with."""
        return self._version

    @property
    def busy(self) -> int:
        """Rows in flight."""
        return sum(r is not None for r in self._rows)

    @property
    def waiting(self) -> int:
        """Submitted prompts not yet admitted to a row."""
        return len(self._waiting)

    # -- the three calls ------------------------------------------------------------------------
    def submit(self, request_id: Hashable, prompt_ids: Sequence[int]) -> None:
        """Queue a prompt; it enters a free row at the next :meth:`step`."""
        if isinstance(prompt_ids, (str, bytes)):
            raise SamplingError(f"request {request_id!r}: prompt_ids must be token ids, not a string; tokenize it.")
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise SamplingError(f"request {request_id!r}: the prompt is empty; it needs at least one token (e.g. BOS).")
        if len(ids) > self.max_prompt_length:
            raise SamplingError(
                f"request {request_id!r}: the prompt has {len(ids)} tokens, more than max_prompt_length="
                f"{self.max_prompt_length}; truncate it or build the sampler with a larger max_prompt_length.")
        vocab = int(self.spec.vocab_size)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise SamplingError(f"request {request_id!r}: token ids {bad[:5]} lie outside the vocabulary [0, {vocab}).")
        with self._lock:
            if request_id in self._known:
                raise SamplingError(f"request id {request_id!r} is already waiting or in flight; ids must be unique "
                                    "among unfinished requests.")
            self._known.add(request_id)
            self._waiting.append((request_id, ids))

    def step(self) -> list[Finished]:
        """One decode step for every row in flight, then admit waiting prompts into free rows; return the rows
        that finished in this step (each request finishes exactly once)."""
        with self._lock:
            chosen_rows: list[int] = []
            logits: list[np.ndarray] = []
            busy = [i for i, r in enumerate(self._rows) if r is not None]
            if busy:
                tokens = np.where([r is not None for r in self._rows], self._pending, 0).astype(np.int32)
                out = self._decoder.decode(tokens, self._lengths)
                self._lengths[busy] += 1
                chosen_rows += busy
                logits.append(out[busy])
            prefilled: dict[tuple[int, ...], tuple[int, np.ndarray]] = {}  # this step's prompts: row, logits
            for i in range(self.slots):
                if not self._waiting:
                    break
                if self._rows[i] is not None:
                    continue
                request_id, ids = self._waiting.popleft()
                twin = prefilled.get(tuple(ids))
                if twin is None:  # a repeat admitted in the same step (same weights) copies the twin's cache
                    twin = (i, self._decoder.prefill(i, np.asarray(ids, np.int32), self.max_prompt_length)[None])
                    prefilled[tuple(ids)] = twin
                else:
                    self._decoder.copy_row(twin[0], i)
                logits.append(twin[1])
                self._rows[i] = _Row(request_id, ids, [], [], [])
                self._lengths[i] = len(ids)
                chosen_rows.append(i)
            if not chosen_rows:
                return []
            tok, lp = choose_tokens(np.concatenate(logits, 0), self.sampling, rng=self._rng)
            return [f for f in (self._record(i, int(t), float(p)) for i, t, p in zip(chosen_rows, tok, lp))
                    if f is not None]

    def update_weights(self, weights: Mapping[str, np.ndarray], version: int) -> None:
        """Adopt new canonical weights and ``version`` between two decode steps; rows in flight continue.

        Their cached K/V stay as the earlier weights computed them, unless the sampler was built with
        ``recompute_kv=True``: then every in-flight row's prompt and completion so far is re-prefilled
        with the new weights (its pending last token keeps the version that chose it).
        """
        _check_version(version)
        with self._lock:
            self._decoder.load_weights(weights)
            self._version = int(version)
            if not self.recompute_kv:
                return
            for i, row in enumerate(self._rows):
                if row is not None:
                    ids = np.asarray(row.prompt + row.tokens[:-1], np.int32)
                    self._decoder.prefill(i, ids, self._max_len)

    def run(self, prompts: Mapping[Hashable, Sequence[int]] | Sequence[Sequence[int]]) -> dict[Hashable, Finished]:
        """Submit ``prompts`` (ids -> prompt, or a list keyed by index) and step until all of them finish."""
        items = prompts.items() if isinstance(prompts, Mapping) else enumerate(prompts)
        wanted = []
        for request_id, ids in items:
            self.submit(request_id, ids)
            wanted.append(request_id)
        done: dict[Hashable, Finished] = {}
        while any(w not in done for w in wanted):
            for f in self.step():
                done[f.request_id] = f
        return {w: done[w] for w in wanted}

    # -- internals ------------------------------------------------------------------------------
    def _record(self, i: int, token: int, logprob: float) -> Finished | None:
        """Append row ``i``'s new token; free the row and return it when it stops."""
        row = self._rows[i]
        assert row is not None
        row.tokens.append(token)
        row.logprobs.append(logprob)
        row.versions.append(self._version)
        n = len(row.tokens)
        stopped = bool(np.isin(token, self._eos)) or bool(
            stop_matches(np.asarray([row.tokens]), n, self.sampling.stop_sequences)[0])
        if not stopped and n < self.sampling.max_new_tokens:
            self._pending[i] = token
            return None
        self._rows[i] = None
        self._lengths[i] = 0
        self._known.discard(row.request_id)
        return Finished(request_id=row.request_id, prompt_ids=row.prompt, tokens=np.asarray(row.tokens, np.int64),
                        logprobs=np.asarray(row.logprobs, np.float32), versions=np.asarray(row.versions, np.int64),
                        truncated=not stopped)


def _check_version(version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
        raise SamplingError(f"version must be an integer (the policy version of the weights), got {version!r}.")
