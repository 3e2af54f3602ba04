"""The generator role, written once for every placement (a thread, a process, a Ray actor).

A generator owns its own copy of the policy (built from canonical weights), takes *jobs* (one step's prompts),
and returns whole groups stamped with the weight version of every token and its behaviour log-prob. Before
each job (batch generator) or between decode steps (continuous generator; the vLLM generator between engine
steps, ``diptych.asyncrl.vllm_generator``) it asks its weight source for
anything newer than what it holds: that poll is the whole weight protocol, so the same loop reads weights from
a dict in memory, from shared memory or from Ray's object store.

The loop is framework-free: the model work goes through the Backend protocol and the sampling phase of the
GRPO loop (``diptych.core.trainers.grpo.sample_rollout``), handed in as ``sample`` so this module does not
import the trainer that imports it.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from diptych.asyncrl.groups import GeneratedBatch, Group, groups_from_rollout
from diptych.asyncrl.stream import STOP, Job, Sink, Source, StreamingGenerator, WeightPoll


class BatchGenerator:
    """One ``sample`` call per job, on the weights current at its start: the synchronous loop's exact draws."""

    def __init__(self, backend: Any, spec: Any, tokenizer: Any, cfg: Any, sample: Callable[..., Any]) -> None:
        self.backend, self.spec, self.tokenizer, self.cfg, self.sample = backend, spec, tokenizer, cfg, sample
        self.model: Any = None
        self.version = -1

    def update_weights(self, weights: Mapping[str, np.ndarray], version: int) -> None:
        self.model = self.backend.build(self.spec, dict(weights))
        self.version = int(version)

    def run(self, source: Source, sink: Sink, poll: WeightPoll, should_stop: Callable[[], bool]) -> None:
        idle = 0.0
        while not should_stop():
            t0 = time.perf_counter()
            try:
                job = source.get(timeout=0.1)
            except queue.Empty:
                idle += time.perf_counter() - t0
                continue
            if job is STOP:
                return
            newer = poll(self.version)
            if newer is not None:
                self.update_weights(newer[1], newer[0])
            idle += time.perf_counter() - t0
            t1 = time.perf_counter()
            rollout = self.sample(self.backend, self.model, self.tokenizer, job.rows, self.cfg, job.step)
            groups = groups_from_rollout(rollout, job.rows, job.step, job.first_index, self.version,
                                         self.cfg.max_prompt_length, self.cfg.num_generations)
            sink.put(GeneratedBatch(groups, busy_s=time.perf_counter() - t1, idle_s=idle))
            idle = 0.0


class ContinuousGenerator(StreamingGenerator):
    """Continuous batching on the native sampler (``diptych.rollout.continuous.ContinuousSampler``)."""

    def __init__(self, backend: Any, spec: Any, tokenizer: Any, cfg: Any, slots: int, recompute_kv: bool = False,
                 step_delay_s: float = 0.0) -> None:
        self.backend, self.spec, self.tokenizer, self.cfg = backend, spec, tokenizer, cfg
        self.slots, self.recompute_kv, self.step_delay_s = int(slots), bool(recompute_kv), float(step_delay_s)
        self.sampler: Any = None
        self.version = -1

    def update_weights(self, weights: Mapping[str, np.ndarray], version: int) -> None:
        if self.sampler is None:
            from diptych.rollout.continuous import ContinuousSampler

            sampling = replace(self.cfg.sampling(self.tokenizer), n=1)
            model = self.backend.build(self.spec, dict(weights))
            self.sampler = ContinuousSampler(self.backend, model, sampling, slots=self.slots,
                                             max_prompt_length=self.cfg.max_prompt_length,
                                             seed=int(self.cfg.seed) * 100003, version=int(version),
                                             recompute_kv=self.recompute_kv)
        else:
            self.sampler.update_weights(dict(weights), int(version))
        self.version = int(version)

    def _ready(self) -> bool:
        return self.sampler is not None

    def _inflight(self) -> bool:
        return bool(self.sampler.busy or self.sampler.waiting)

    def _submit(self, job: Job, ids: list[list[int]]) -> None:
        for i, p in enumerate(ids):
            for j in range(self.cfg.num_generations):
                self.sampler.submit((job.first_index + i, j), p)

    def _finished(self) -> Iterator[tuple[int, int, Any]]:
        for f in self.sampler.step():
            index, j = f.request_id
            yield index, j, f


def check_generator(cfg: Any, engine: Any = None) -> None:
    """Refuse, before anything starts, a generator kind that cannot serve this config (one line, what to change).

    ``batch`` and ``continuous`` build the backend's native sampler, so they need ``rollout: native``; ``vllm``
    starts its own vLLM engine from the run's ``vllm:`` block, so it needs ``rollout: vllm``
    (``diptych.asyncrl.vllm_generator.check_vllm_generator``). A trainer's own engine (``engine``) is not used by
    the asynchronous loop: the generator role holds its own copy of the policy."""
    from diptych.core.trainers.base import TrainerError

    kind = cfg.async_.generator
    if kind == "vllm":
        from diptych.asyncrl.vllm_generator import check_vllm_generator

        check_vllm_generator(cfg)
        return
    if engine is not None or getattr(cfg, "rollout", "native") != "native":
        raise TrainerError(f"async.generator={kind} builds the native sampler, so it needs rollout: native; set "
                           "async.generator=vllm to generate with vLLM, or rollout=native.")


def make_generator(kind: str, backend: Any, spec: Any, tokenizer: Any, cfg: Any, sample: Callable[..., Any],
                   slots: int | None = None, recompute_kv: bool = False, step_delay_s: float = 0.0) -> Any:
    """The generator role of kind ``batch``, ``continuous`` or ``vllm`` (``async.generator``)."""
    if kind == "batch":
        return BatchGenerator(backend, spec, tokenizer, cfg, sample)
    if kind == "vllm":
        from diptych.asyncrl.vllm_generator import VLLMGenerator

        return VLLMGenerator(backend, spec, tokenizer, cfg, slots=slots, recompute_kv=recompute_kv,
                             step_delay_s=step_delay_s)
    return ContinuousGenerator(backend, spec, tokenizer, cfg,
                               slots or cfg.prompts_per_step * cfg.num_generations, recompute_kv, step_delay_s)


def group_lag(group: Group, version: int) -> np.ndarray:
    """Per-token lag ``version - token version`` on the group's mask (0 elsewhere)."""
    v = group.arrays["versions"]
    return np.where(group.arrays["mask"] > 0, version - v, 0)
