"""vLLM as the asynchronous generator (``async.generator: vllm``, issue 20 with issue 17's engine).

The generator role drives a colocated :class:`diptych.rollout.vllm_engine.VLLMEngine` that it starts itself, in
the trainer's process (``placement: thread``) or in its own (``placement: process``), on the canonical weights
the trainer publishes and with the run's ``vllm:`` block, as the synchronous ``rollout: vllm`` loop starts its
engine. It streams: each job's prompts x ``num_generations`` join the rows already decoding (vLLM's continuous
batching, :meth:`VLLMEngine.submit`), the engine steps, and a group leaves as soon as its last completion ends.
Between two engine steps it asks its weight source for anything newer and hands it to
:meth:`VLLMEngine.update_weights_in_flight` (vLLM's pause / update / resume at a step boundary), so one
completion may span several versions. The rows in flight keep their K/V (Magistral), or, with
``async.recompute_kv``, vLLM preempts them and rebuilds it with the new weights.

Each job is submitted as one generate call would build it (same rows ``i * n + j``, same per-row seeds
``seed * 100003 + step + r``), so with ``max_staleness: 0``, where a job runs alone on the weights the
synchronous loop has, the groups are the synchronous ``rollout: vllm`` run's rollouts.

vLLM is imported only when an engine starts; this module imports without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from diptych.asyncrl.stream import Job, Sink, Source, StreamingGenerator, WeightPoll


def check_vllm_generator(cfg: Any) -> None:
    """Refuse, before anything starts, a run the vLLM generator cannot serve (one line: what to change)."""
    from diptych.core.trainers.base import TrainerError
    from diptych.rollout.vllm_engine import INSTALL_HINT, vllm_installed

    a = cfg.async_
    if getattr(cfg, "rollout", "native") != "vllm":
        raise TrainerError("async.generator=vllm samples with vLLM: set rollout=vllm (its vllm: block configures "
                           "the generator's engine), or async.generator=batch|continuous for the native sampler.")
    if cfg.depth is not None:
        raise TrainerError("vLLM cannot serve recurrent-depth models (their depth loop is not a vLLM architecture); "
                           "use rollout=native with async.generator=batch.")
    if cfg.parity:
        raise TrainerError("parity noise needs the native sampler (vLLM draws its own noise); set parity=false, or "
                           "rollout=native with async.generator=batch.")
    if cfg.vllm.mode != "colocated":
        raise TrainerError("async.generator=vllm starts its own colocated engine in the generator role (weights "
                           "swapped between engine steps); set vllm.mode=colocated (server mode has no in-flight "
                           "swap).")
    if a.placement == "ray":
        raise TrainerError("async.generator=vllm runs with placement thread or process (a vLLM engine inside a Ray "
                           "actor is untested here); set async.placement=process.")
    if not vllm_installed():
        raise TrainerError(f"async.generator=vllm needs vLLM, which is not installed; {INSTALL_HINT}.")


class VLLMGenerator(StreamingGenerator):
    """The generator role on a vLLM engine; see the module docstring.

    ``engine``: an engine to drive instead of starting one (tests share one across runs); it is left open.
    ``step_delay_s`` sleeps after every engine step: a scripted slow generator, so new weights land mid-generation.
    """

    def __init__(self, backend: Any, spec: Any, tokenizer: Any, cfg: Any, *, slots: int | None = None,
                 recompute_kv: bool = False, step_delay_s: float = 0.0, engine: Any = None) -> None:
        from diptych.rollout.vllm_engine import check_servable

        check_servable(spec)  # a model vLLM cannot run fails here, in the driver for a thread placement
        self.backend, self.spec, self.tokenizer, self.cfg = backend, spec, tokenizer, cfg
        self.slots, self.recompute_kv, self.step_delay_s = slots, bool(recompute_kv), float(step_delay_s)
        self.engine = engine
        self._owns = engine is None
        self.version = -1
        self._versions: dict[int, int] = {}
        """engine weight version -> the trainer's version (an engine's versions only go up, from wherever it was)."""

    def update_weights(self, weights: Mapping[str, np.ndarray], version: int) -> None:
        """Start the engine on the first weights; later ones go in between two engine steps."""
        if self.engine is None:
            from diptych.rollout.vllm_engine import VLLMEngine

            extra = {} if self.slots is None else {"max_num_seqs": int(self.slots)}
            cfg = self.cfg
            longest = int(cfg.max_prompt_length) + int(cfg.max_completion_length)  # as the sync loop's engine
            self.engine = VLLMEngine(self.spec, dict(weights), sampling=cfg.sampling(self.tokenizer), config=cfg.vllm,
                                     version=0, max_model_len=longest, **extra)
        else:
            self.engine.update_weights_in_flight(dict(weights), self.engine.weight_version + 1,
                                                 recompute_kv=self.recompute_kv)
        self._versions[self.engine.weight_version] = int(version)
        self.version = int(version)

    def _trainer_versions(self, versions: np.ndarray) -> np.ndarray:
        return np.asarray([self._versions[int(v)] for v in versions], np.int64)

    def run(self, source: Source, sink: Sink, poll: WeightPoll, should_stop: Callable[[], bool]) -> None:
        try:
            super().run(source, sink, poll, should_stop)
        finally:
            self.close()

    def _ready(self) -> bool:
        return self.engine is not None and self.version >= 0

    def _inflight(self) -> bool:
        return bool(self.engine.streaming)

    def _submit(self, job: Job, ids: list[list[int]]) -> None:
        cfg = self.cfg
        self.engine.submit(ids, cfg.sampling(self.tokenizer), seed=int(cfg.seed) * 100003 + job.step,
                           tag=job.first_index)

    def _finished(self) -> Iterator[tuple[int, int, Any]]:
        g = int(self.cfg.num_generations)
        for f in self.engine.step():
            first, r = f.request_id
            i, j = divmod(int(r), g)
            f.versions = self._trainer_versions(f.versions)
            yield first + i, j, f

    def close(self) -> None:
        """Stop the engine this generator started (an engine handed in stays open, drained of this run's rows)."""
        engine, self.engine = self.engine, None
        if engine is None:
            return
        if self._owns:
            engine.close()
        else:
            while engine.streaming:  # a shared engine must not carry this run's rows into the next
                engine.step()
