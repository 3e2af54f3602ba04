"""The ``async:`` block of the GRPO config (written ``async`` in YAML and flags, ``async_`` in Python)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

STALE_POLICIES = ("drop", "reweight")
CORRECTIONS = ("none", "tis", "decoupled")
PLACEMENTS = ("thread", "process", "ray")
GENERATORS = ("batch", "continuous", "vllm")
ON_DEATH = ("fail", "restart")


class AsyncConfigError(ValueError):
    """An ``async:`` setting that cannot work, with what to change."""


@dataclass
class AsyncConfig:
    """Off by default: GRPO runs synchronously (generate, score, train, in turn).

    Staleness is counted in optimizer steps: a token sampled with weight version ``v`` and trained at
    version ``s`` (the trainer has made ``s`` updates) has lag ``s - v``. A group is as old as its oldest
    token, and groups stay whole (GRPO's advantages need every completion of a prompt).
    """

    enabled: bool = False
    max_staleness: int = 1
    """How many optimizer steps old a token's policy version may be when it is trained on."""
    max_ahead: int | None = None
    """How many steps' worth of prompts the generator may hold beyond the batch in training; None: max_staleness,
    so no group ever goes stale. Larger lets the generator wait less, and groups beyond max_staleness then meet
    ``stale_policy``."""
    stale_policy: Literal["drop", "reweight"] = "drop"
    """A group older than max_staleness: ``drop`` it (metric ``async/groups_dropped``) or ``reweight`` its tokens'
    advantages by ``stale_decay ** (lag - max_staleness)``."""
    stale_decay: float = 0.5
    correction: Literal["none", "tis", "decoupled"] = "none"
    """Off-policy correction in the loss (``diptych.core.losses.offpolicy``): none (Magistral), tis (truncated
    importance sampling against the behaviour log-probs) or decoupled (AReaL's proximal policy)."""
    correction_cap: float = 2.0
    """tis: the cap of the importance weight; decoupled: tokens whose weight exceeds it are left out."""
    generator: Literal["batch", "continuous", "vllm"] = "batch"
    """``batch``: one ``backend.generate`` per step's prompts (its tokens carry the version at its start; the
    synchronous loop's exact draws); ``continuous``: the continuous-batching sampler, new weights between decode
    steps, so one completion may span several versions (``diptych.rollout.continuous``); ``vllm``: a vLLM engine
    the generator starts itself (needs ``rollout: vllm``; its ``vllm:`` block), continuous batching, new weights
    between engine steps (``diptych.asyncrl.vllm_generator``)."""
    slots: int | None = None
    """continuous: rows decoding at once (None: prompts_per_step x num_generations); vllm: vLLM's ``max_num_seqs``
    (None: vLLM's default)."""
    recompute_kv: bool = False
    """continuous, vllm: rewrite the KV cache of rows in flight when new weights arrive (default: keep it, as
    Magistral)."""
    placement: Literal["thread", "process", "ray"] = "thread"
    """Where the generator runs: a thread of the trainer's process, its own process (weights through shared
    memory), or a Ray actor (weights through the object store; the ``ray`` extra)."""
    warm_start: bool = True
    """process placement, batch generator: the trainer's process samples the first jobs while the generator process
    starts (its start-up is seconds), then hands over; the draws are the same either way."""
    generator_cores: tuple[int, ...] | None = None
    """process placement: pin the generator process to these CPU cores (``os.sched_setaffinity``)."""
    verifier_workers: int = 2
    """Threads scoring finished groups (rewards, the sandboxed code reward) off the generator's path."""
    on_generator_death: Literal["fail", "restart"] = "fail"
    """process / ray placement: when the generator dies, stop with a clear error, or start a new one (once per
    ``max_restarts``) on the trainer's latest weights."""
    max_restarts: int = 2
    timeout_s: float = 600.0
    """The longest the trainer waits for one group before it calls the generator stuck."""

    def __post_init__(self) -> None:
        if self.max_staleness < 0:
            raise AsyncConfigError(f"max_staleness must be >= 0, got {self.max_staleness}.")
        if self.max_ahead is not None and self.max_ahead < 0:
            raise AsyncConfigError(f"max_ahead must be >= 0 or None (= max_staleness), got {self.max_ahead}.")
        for name, value, choices in (("stale_policy", self.stale_policy, STALE_POLICIES),
                                     ("correction", self.correction, CORRECTIONS),
                                     ("placement", self.placement, PLACEMENTS),
                                     ("generator", self.generator, GENERATORS),
                                     ("on_generator_death", self.on_generator_death, ON_DEATH)):
            if value not in choices:
                raise AsyncConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}.")
        if not 0.0 < self.stale_decay <= 1.0:
            raise AsyncConfigError(f"stale_decay must be in (0, 1], got {self.stale_decay}.")
        if not self.correction_cap > 0:
            raise AsyncConfigError(f"correction_cap must be > 0 (about 2), got {self.correction_cap}.")
        if self.slots is not None and self.slots < 1:
            raise AsyncConfigError(f"slots must be >= 1 or None, got {self.slots}.")
        if self.verifier_workers < 1:
            raise AsyncConfigError(f"verifier_workers must be >= 1, got {self.verifier_workers}.")
        if self.max_restarts < 0:
            raise AsyncConfigError(f"max_restarts must be >= 0, got {self.max_restarts}.")
        if not self.timeout_s > 0:
            raise AsyncConfigError(f"timeout_s must be > 0, got {self.timeout_s}.")
        if self.generator_cores is not None:
            self.generator_cores = tuple(int(c) for c in self.generator_cores)
            if not self.generator_cores or min(self.generator_cores) < 0:
                raise AsyncConfigError(f"generator_cores must be CPU indices >= 0 (e.g. [1]), got "
                                       f"{self.generator_cores}.")
            if self.placement != "process":
                raise AsyncConfigError("generator_cores pins the generator process: set placement=process, or drop "
                                       "generator_cores.")

    @property
    def ahead(self) -> int:
        """Steps the generator may run ahead (``max_ahead``, defaulting to ``max_staleness``)."""
        return self.max_staleness if self.max_ahead is None else self.max_ahead
