"""Built-in verifiable tasks small enough to train a char-level model on a laptop CPU in minutes.

``get_task("arithmetic" | "countdown" | "running_sum", **knobs)``; see ``base.Task`` for the contract.
"""

from diptych.core.tasks.arithmetic import Arithmetic
from diptych.core.tasks.base import Task, available_tasks, get_task, register_task, split_of
from diptych.core.tasks.countdown import Countdown
from diptych.core.tasks.running_sum import RunningSum

__all__ = ["Arithmetic", "Countdown", "RunningSum", "Task", "available_tasks", "get_task", "register_task",
           "split_of"]
