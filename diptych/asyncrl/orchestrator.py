"""Asynchronous GRPO (Magistral-style): a generator that runs ahead, verifiers off its path, a trainer that steps
as soon as a batch of whole groups is scored, all joined by bounded queues.

::

    feeder --Slots--> generator (thread | process | Ray actor) --groups, per-token versions--> verifier pool
    verifier pool --Scored--> trainer: drop / re-weight stale groups, advantages, train_on_batch, publish weights

The trainer's version is its number of optimizer steps. A token sampled with version ``v`` and trained at
version ``s`` has lag ``s - v``; a group's lag is its oldest token's. Groups with lag above ``max_staleness``
are dropped (``async/groups_dropped``) or re-weighted (``stale_policy``). The generator starts a step's prompts
only when ``Slots`` allows (``max_ahead``, default ``max_staleness``), and the trainer publishes new weights
*before* it frees the slots of the groups it trained on, so with ``max_staleness = 0`` every rollout is drawn
with the weights the synchronous loop would have, by the same ``sample`` call: the two runs are step for step
the same (``tests/asyncrl/test_async_grpo.py``).

This module is framework-free: the backend is reached through the Backend protocol and the GRPO loop's
phases (:class:`Phases`, handed in by ``diptych.core.trainers.grpo.train_grpo``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from diptych.asyncrl.groups import GeneratedBatch, Group, assemble
from diptych.asyncrl.placement import Failure, GeneratorSpec, ProcessGenerator, ThreadGenerator, WarmStartGenerator
from diptych.asyncrl.queues import Scored, Slots
from diptych.asyncrl.roles import check_generator, group_lag
from diptych.asyncrl.stream import Job
from diptych.core.trainers.base import DivergenceError, StepTimer, TrainerError, batch_iterator, columns_of


class AsyncRLError(RuntimeError):
    """The asynchronous run cannot go on (a generator died or got stuck); says what happened and what to do."""


@dataclass(frozen=True)
class Phases:
    """The GRPO loop's phases the roles run (``diptych.core.trainers.grpo``)."""

    sample: Callable[..., Any]
    """``sample(backend, model, tokenizer, rows, cfg, step) -> Rollout`` (the generator's)."""
    score: Callable[..., Any]
    """``score(reward, prompts, completions, columns) -> (rewards, components)`` (the verifiers')."""
    advantages: Callable[..., Any]
    """``advantages(batch, rewards, cfg) -> (batch, groups dropped by the filter)``."""
    train: Callable[..., Any]
    """``train(backend, state, batch, cfg, step, ref_model, timer, loss) -> (state, metrics)`` (the trainer's)."""


def check_async(cfg: Any, engine: Any = None) -> None:
    """Refuse what the asynchronous loop cannot run, before anything starts."""
    a = cfg.async_
    check_generator(cfg, engine)  # what the chosen generator kind can serve (diptych.asyncrl.roles)
    if cfg.trajectory is not None and a.correction != "none":
        raise TrainerError("trajectory credit (RLTT) trains on-policy per iteration; with async.enabled keep "
                           "async.correction=none or drop trajectory.")
    if a.generator == "continuous" and cfg.parity:
        raise TrainerError("parity noise is for the batch generator; set async.generator=batch or parity=false.")
    if a.generator == "continuous" and cfg.depth is not None:
        raise TrainerError("the continuous generator serves decoder models; recurrent-depth models need "
                           "async.generator=batch.")


def train_loss(cfg: Any) -> tuple[str, Any] | None:
    """The off-policy loss when a correction is asked for; None keeps the synchronous loss."""
    a = cfg.async_
    if a.correction == "none":
        return None
    from diptych.core.losses.offpolicy import OffPolicyLossConfig

    return "offpolicy", OffPolicyLossConfig(policy=cfg.loss_config(), correction=a.correction, cap=a.correction_cap)


class LocalTrainer:
    """The trainer role in the driver's own process: the GRPO loop's train phase on a state it holds."""

    def __init__(self, backend: Any, state: Any, cfg: Any, phases: Phases, ref_model: Any, loss: Any) -> None:
        self.backend, self.state, self.cfg, self.phases = backend, state, cfg, phases
        self.ref_model, self.loss = ref_model, loss

    def train(self, batch: dict[str, np.ndarray], step: int, timer: StepTimer) -> dict[str, float]:
        self.state, metrics = self.phases.train(self.backend, self.state, batch, self.cfg, step, self.ref_model,
                                                timer, self.loss)
        return metrics

    def weights(self) -> dict[str, np.ndarray]:
        return self.backend.export_weights(self.state)

    def close(self) -> None:
        pass


class AsyncGRPO:
    """One asynchronous run of ``cfg.steps - start_step`` steps; :meth:`run` returns the final state."""

    def __init__(self, backend: Any, state: Any, tokenizer: Any, reward: Any, rows: Sequence[dict[str, Any]],
                 cfg: Any, phases: Phases, ref_model: Any = None, start_step: int = 0,
                 generator: Any = None, on_publish: Callable[[int, dict[str, np.ndarray]], None] | None = None,
                 train_delay_s: float = 0.0, step_delay_s: float = 0.0, warm_start: bool | None = None) -> None:
        self.backend, self.tokenizer, self.reward = backend, tokenizer, reward
        self.spec = state.model.spec
        self.rows, self.cfg, self.phases, self.ref_model = list(rows), cfg, phases, ref_model
        self.a = cfg.async_
        self.start, self.version = int(start_step), int(start_step)
        self.P, self.G = int(cfg.prompts_per_step), int(cfg.num_generations)
        self.slots = Slots((self.a.ahead + 1) * self.P)
        self.scored = Scored()
        self.pool = ThreadPoolExecutor(self.a.verifier_workers, thread_name_prefix="diptych-verifier")
        self.loss = train_loss(cfg)
        self.on_publish, self.train_delay_s = on_publish, float(train_delay_s)
        self.warm_start = self.a.warm_start if warm_start is None else bool(warm_start)
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._pending: dict[int, Job] = {}  # jobs handed to the generator whose groups have not all come back
        self._arrived: dict[int, int] = {}  # job step -> groups come back
        self._seen: set[int] = set()
        self._lock = threading.Lock()
        self._needed = threading.Condition(self._lock)  # the feeder waits on it once every needed prompt is out
        self._gen_busy = self._gen_idle = 0.0
        self._gen_tokens = 0
        self._gen_totals = [0.0, 0]  # busy seconds and tokens since the start: the generator's running throughput
        self.restarts = 0
        self.end = int(cfg.steps)
        self._dropped_total = 0  # groups dropped as stale: the feeder hands out as many prompts beyond the end
        self._closed = False
        self._died: str | None = None
        t0 = time.perf_counter()
        if self.a.placement == "ray":
            from diptych.asyncrl.ray_placement import RayTrainer

            self.trainer: Any = RayTrainer(backend, state, cfg, phases, ref_model, self.loss)
        else:
            self.trainer = LocalTrainer(backend, state, cfg, phases, ref_model, self.loss)
        weights = self.trainer.weights()
        self.generator = generator if generator is not None else self._make_generator(weights, step_delay_s)
        self._publish(weights)
        self.startup_s = time.perf_counter() - t0  # the generator's own start-up overlaps the first steps

    # -- roles ----------------------------------------------------------------------------------
    def _make_generator(self, weights: dict[str, np.ndarray], step_delay_s: float) -> Any:
        gspec = GeneratorSpec(backend=self.backend.name, spec=self.spec, tokenizer=self.tokenizer,
                              cfg=self.cfg, sample=self.phases.sample, kind=self.a.generator, slots=self.a.slots,
                              recompute_kv=self.a.recompute_kv, step_delay_s=step_delay_s)
        if self.a.placement == "thread":
            return ThreadGenerator(gspec, self.backend)
        if self.a.placement == "process":
            proc = ProcessGenerator(gspec, weights, self.a.generator_cores)
            if self.warm_start and self.a.generator == "batch":  # the trainer samples while the process starts
                # on the generator's cores, so the trainer keeps its own core to itself from the first step
                return WarmStartGenerator(proc, ThreadGenerator(gspec, self.backend, self.a.generator_cores))
            return proc
        from diptych.asyncrl.ray_placement import RayGenerator

        return RayGenerator(gspec)

    def _publish(self, weights: Any) -> None:
        """Weights to the generator (a dict, or the Ray trainer's object-store handle that never visits here)."""
        self.generator.publish(weights, self.version)
        if self.on_publish is not None:
            self.on_publish(self.version, weights if isinstance(weights, dict) else weights.fetch())

    def _feed(self) -> None:
        """Hand the generator one step's prompts whenever the slots allow (the data order of the sync loop).

        It stops once the generator holds every prompt the run will train on: the steps up to ``end`` and one
        more prompt per group dropped as stale. No prompt is sampled for nothing after the last step (a kill
        landing in such work would go unnoticed)."""
        try:
            for k, chunk in batch_iterator(self.rows, self.P, self.cfg.seed, start=self.start):
                with self._needed:  # wait until the run needs this step's prompts (a stale drop may ask for more)
                    while (k - self.start) * self.P >= (self.end - self.start) * self.P + self._dropped_total:
                        if self._stop.is_set():
                            return
                        self._needed.wait(1.0)
                ok, _ = self.slots.take(self.P)
                if not ok or self._stop.is_set():
                    return
                job = Job(step=k, rows=chunk, first_index=k * self.P)
                with self._lock:  # not during a restart: the old generator's queues are closing
                    self._pending[k] = job
                    self._arrived[k] = 0
                    self.generator.submit(job)
        except BaseException as e:
            self._errors.append(e)

    def _collect(self) -> None:
        """Move finished groups from the generator to the verifier pool (the generator never waits on them)."""
        try:
            while not self._stop.is_set():
                try:
                    item = self.generator.results(timeout=0.2)
                except queue.Empty:
                    continue
                except (EOFError, OSError, ValueError):  # died mid-put, or a restart closed the queue: the trainer
                    # notices and decides
                    time.sleep(0.2)
                    continue
                if isinstance(item, Failure):
                    self._errors.append(AsyncRLError(f"the generator failed: {item.message}"))
                    return
                self._take_batch(item)
        except BaseException as e:
            self._errors.append(e)

    def _take_batch(self, item: GeneratedBatch) -> None:
        with self._lock:
            self._gen_busy += item.busy_s
            self._gen_idle += item.idle_s
            for gr in item.groups:
                if gr.index in self._seen:  # a restarted generator redid a job that had partly come back
                    continue
                self._seen.add(gr.index)
                self._gen_tokens += gr.tokens
                self._arrived[gr.step] = self._arrived.get(gr.step, 0) + 1
                if self._arrived[gr.step] >= self.P:
                    self._pending.pop(gr.step, None)
                self.pool.submit(self._verify, gr)

    def _verify(self, gr: Group) -> None:
        try:
            texts = [self.tokenizer.decode(c) for c in gr.completions]
            columns = {**columns_of([gr.row], exclude=("prompt",), repeat=self.G),
                       "completion_lengths": [len(c) for c in gr.completions]}
            gr.rewards, gr.components = self.phases.score(self.reward, [gr.row["prompt"]] * self.G, texts, columns)
            self.scored.put(gr)
        except BaseException as e:
            self._errors.append(e)

    # -- the trainer ----------------------------------------------------------------------------
    def _next_group(self) -> tuple[Group, float]:
        """The next scored group, waiting as long as needed (the trainer's idle time) and watching the generator."""
        t0 = time.perf_counter()
        while True:
            if self._errors:
                raise self._errors[0]
            gr = self.scored.get(timeout=0.2)
            if gr is not None:
                return gr, time.perf_counter() - t0
            if not self.generator.alive():
                self._generator_died()
            if time.perf_counter() - t0 > self.a.timeout_s:
                raise AsyncRLError(f"no scored group for {self.a.timeout_s:.0f} s (async.timeout_s): the generator "
                                   "or a verifier is stuck; the last checkpoint is intact, resume with --resume.")

    def _generator_died(self) -> None:
        why = self.generator.death()
        if self.a.on_generator_death == "fail" or self.restarts >= self.a.max_restarts:
            more = f" (after {self.restarts} restarts, async.max_restarts)" if self.restarts else ""
            raise AsyncRLError(f"{why} at trainer step {self.version}{more}. The checkpoints already written are "
                               "intact: resume with --resume, or set async.on_generator_death=restart to start a new "
                               "generator on the trainer's latest weights.")
        self.restarts += 1
        weights = self.trainer.weights()
        with self._lock:  # the feeder waits: no job goes to the old generator's closed queue meanwhile
            self.generator.restart()
            self.generator.publish(weights, self.version)
            for job in sorted(self._pending.values(), key=lambda j: j.step):
                self.generator.submit(job)

    def _take_batch_for_step(self) -> tuple[list[Group], dict[str, float]]:
        groups: list[Group] = []
        dropped, waited = 0, 0.0
        k = self.a.max_staleness
        while len(groups) < self.P:
            gr, w = self._next_group()
            waited += w
            lag = self.version - gr.oldest
            if lag > k and self.a.stale_policy == "drop":
                dropped += 1
                with self._needed:
                    self._dropped_total += 1  # one more prompt needed: the feeder wakes and hands it out
                    self._needed.notify_all()
                self.slots.give(1)
                continue
            groups.append(gr)
        return groups, {"async/groups_dropped": float(dropped), "async/trainer_idle_s": waited}

    def _stale_weights(self, groups: list[Group]) -> np.ndarray | None:
        """``reweight``: per-token advantage weights ``stale_decay ** (lag - max_staleness)`` where lag exceeds it."""
        if self.a.stale_policy != "reweight":
            return None
        lag = np.concatenate([group_lag(g, self.version) for g in sorted(groups, key=lambda g: g.index)])
        over = np.maximum(lag - self.a.max_staleness, 0)
        return np.power(self.a.stale_decay, over).astype(np.float32)

    def step(self, s: int) -> dict[str, float]:
        timer = StepTimer()
        groups, metrics = self._take_batch_for_step()
        with timer.phase("score"):
            batch, rewards = assemble(groups)
            versions = batch.pop("versions")
            batch, filtered = self.phases.advantages(batch, rewards, self.cfg)
            weights = self._stale_weights(groups)
            if weights is not None:
                batch["advantages"] = batch["advantages"][:, None] * weights
        on = batch["mask"] > 0
        lag = (self.version - versions)[on]
        lengths = batch["mask"].sum(1)
        comp = {}
        for key in sorted({c for g in groups for c in g.components}):
            comp[key] = float(np.mean([g.components[key] for g in groups if key in g.components]))
        metrics.update({
            "reward": float(rewards.mean()), "reward_std": float(rewards.std()),
            "completion_length": float(lengths.mean()),
            "truncated_frac": float(np.concatenate([g.truncated for g in groups]).mean()),
            "groups_dropped": float(filtered), **comp,
            "async/staleness_mean": float(lag.mean()) if lag.size else 0.0,
            "async/staleness_max": float(lag.max()) if lag.size else 0.0,
            "weight_version": float(min(g.oldest for g in groups)),
        })
        if self.train_delay_s:
            time.sleep(self.train_delay_s)  # a scripted slow trainer (tests)
        metrics.update(self.trainer.train(batch, s, timer))
        if "offpolicy_clipfrac" in metrics:
            metrics["async/correction_clipfrac"] = metrics["offpolicy_clipfrac"]
        with timer.phase("sync"):  # export + publish (shared memory, object store): the trainer's cost of a swap
            self.version = s + 1
            self._publish(self.trainer.weights())
        self.slots.give(len(groups))
        with self._lock:
            busy, idle, tokens = self._gen_busy, self._gen_idle, self._gen_tokens
            self._gen_busy = self._gen_idle = 0.0
            self._gen_tokens = 0
            self._gen_totals[0] += busy
            self._gen_totals[1] += tokens
            total_busy, total_tokens = self._gen_totals
        train_s = timer.seconds.get("train", 0.0)
        metrics.update({
            "async/generator_idle_s": idle, "async/generator_busy_s": busy,
            # since the start: a generator running ahead may hand in nothing during a step (the last ones)
            "async/generator_tokens_per_s": total_tokens / total_busy if total_busy > 0 else 0.0,
            "async/trainer_tokens_per_s": float(batch["mask"].sum()) / train_s if train_s > 0 else 0.0,
            "async/restarts": float(self.restarts),
            "async/warm_start_jobs": float(getattr(self.generator, "thread_jobs", 0)),
            **timer.metrics(),
        })
        if s == self.start:
            metrics["async/startup_s"] = self.startup_s
        total = sum(timer.seconds.values()) + metrics["async/trainer_idle_s"]
        metrics["tokens_per_s"] = float(batch["attention_mask"].sum()) / max(total, 1e-9)
        return metrics

    def run(self, end: int, log: Callable[[int, Callable[[], Any], dict[str, float]], None],
            save: Any = None) -> Any:
        """Train steps ``start .. end - 1`` in this one pipeline; ``log(step, state_fn, metrics)`` after each
        (``state_fn()`` is the trainer's state, fetched only when called: a Ray trainer holds it in its actor),
        ``save(step, state)`` at the save points (``diptych.core.trainers.runner.SavePoints``) while the
        generator keeps working on the next steps."""
        self.end = int(end)
        threads = [threading.Thread(target=f, daemon=True, name=n)
                   for f, n in ((self._feed, "diptych-feeder"), (self._collect, "diptych-collector"))]
        for t in threads:
            t.start()
        try:
            for s in range(self.start, end):
                if not self.generator.alive():  # it may die while every group this step needs is already queued
                    self._generator_died()
                metrics = self.step(s)
                log(s + 1, lambda: self.trainer.state, metrics)
                if save is not None and save.due(s + 1):
                    save(s + 1, self.trainer.state)  # between two steps: the state of step s + 1, written atomically
            final = self.trainer.state
            died = self.close(threads)
            if died is not None and self.a.on_generator_death == "fail":
                # it died in the last step (after the trainer had every group it needed): still an error, and
                # the run's final checkpoint is not written
                raise AsyncRLError(f"{died} during the last step ({end}). The checkpoints already written are "
                                   "intact: resume with --resume.")
            return final
        finally:
            self.close(threads)

    def close(self, threads: Sequence[threading.Thread] = ()) -> str | None:
        """Stop every role; returns how the generator died if it did so on its own before it was stopped."""
        if self._closed:
            return self._died
        self._closed = True
        self._stop.set()
        with self._needed:
            self._needed.notify_all()
        self.slots.close()
        for t in threads:
            t.join(timeout=10)
        self.pool.shutdown(wait=True, cancel_futures=True)
        try:
            self._died = self.generator.close()
        finally:
            self.trainer.close()
        return self._died

    @property
    def state(self) -> Any:
        return self.trainer.state


def train_grpo_async(backend: Any, state: Any, tokenizer: Any, reward: Any, rows: Sequence[dict[str, Any]], cfg: Any,
                     phases: Phases, logger: Any = None, ref_model: Any = None, start_step: int = 0,
                     on_step: Callable[[int, Any, dict[str, float]], None] | None = None, guard: Any = None,
                     save: Any = None, **hooks: Any) -> Any:
    """``train_grpo`` with ``async.enabled``: the same steps, rollouts from a generator that runs ahead."""
    run = AsyncGRPO(backend, state, tokenizer, reward, rows, cfg, phases, ref_model, start_step, **hooks)

    def log(step: int, state_fn: Callable[[], Any], metrics: dict[str, float]) -> None:
        if logger is not None:
            logger.log(step, metrics)
        if guard is not None:
            try:
                guard.check(step, metrics)  # metrics only: it needs the state only when it stops the run
            except DivergenceError as e:
                if e.state is None:
                    e.state = state_fn()
                raise
        if on_step is not None:
            on_step(step, state_fn(), metrics)  # with placement ray: the actor's state, fetched for this call

    return run.run(cfg.steps, log, save)
