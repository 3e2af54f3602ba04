"""How a trainer runs a recurrent-depth model: the depth it trains at and the depth it samples at.

Training and sampling want different depths. Training follows a :class:`DepthSchedule` (Huginn:
r drawn per optimizer step, gradient through the last k iterations only); sampling runs a fixed
depth or stops each token early under an exit criterion. :class:`DepthPolicy` holds both, so a
backend-neutral trainer (GRPO, SFT, ...) calls ``backend.set_depth(model, *policy.train_depth(step))``
before its train step and passes ``**policy.generate_kwargs()`` to ``backend.generate``.

The initial latent state is zero in both places on purpose. Huginn pretrains from a random s0
(the recipe does too), but an RL update compares the sampler's log-probs with the trainer's: a
fresh s0 on each side would make the importance ratio differ from 1 on identical weights, a
bias no clipping can tell from a policy change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diptych.recurrent.exit import CRITERIA
from diptych.recurrent.schedule import DepthSchedule, ScheduleError


@dataclass(frozen=True)
class DepthPolicy:
    """``schedule`` gives the train depth (None: the model's own depth, untruncated);
    ``sample_steps`` the sampling depth, or its cap under ``exit_criterion`` (None: the spec's
    mean recurrence); ``exit_criterion`` a name from ``diptych.recurrent.exit.CRITERIA`` with
    ``exit_threshold`` (None: that criterion's default).
    """

    schedule: DepthSchedule | None = None
    sample_steps: int | None = None
    exit_criterion: str | None = None
    exit_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.schedule is not None and not isinstance(self.schedule, DepthSchedule):
            raise ScheduleError(f"schedule must be a diptych.recurrent.schedule.DepthSchedule or None, got "
                                f"{type(self.schedule).__name__}.")
        if self.sample_steps is not None and int(self.sample_steps) < 1:
            raise ScheduleError(f"sample_steps must be >= 1 (or None for the spec's mean recurrence), "
                                f"got {self.sample_steps}.")
        if self.exit_criterion is not None and self.exit_criterion not in CRITERIA:
            raise ScheduleError(f"Unknown exit_criterion {self.exit_criterion!r}; choose one of "
                                f"{', '.join(sorted(CRITERIA))}, or None for a fixed sampling depth.")
        if self.exit_threshold is not None and self.exit_criterion is None:
            raise ScheduleError("exit_threshold is set but exit_criterion is None; name a criterion "
                                f"({', '.join(sorted(CRITERIA))}) or drop the threshold.")

    def train_depth(self, step: int) -> tuple[int | None, int | None]:
        """(r, k) for optimizer step ``step``, as ``set_depth(model, r, k)`` takes them; (None, None) without
        a schedule (the model's default depth, full backprop)."""
        if self.schedule is None:
            return None, None
        draw = self.schedule.sample(step)
        return draw.num_steps, draw.n_grad

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``backend.generate`` on a recurrent model (only the ones that are set)."""
        out: dict[str, Any] = {}
        if self.sample_steps is not None:
            out["num_steps"] = int(self.sample_steps)
        if self.exit_criterion is not None:
            out["exit_criterion"] = self.exit_criterion
            if self.exit_threshold is not None:
                out["exit_threshold"] = float(self.exit_threshold)
        return out
