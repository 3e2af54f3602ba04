"""Built-in verifiable tasks small enough to train a char-level model on a laptop CPU in minutes.

``get_task(name, **knobs)`` with name one of ``available_tasks()`` (arithmetic, countdown, perm_chain,
running_sum, word_problem); see ``base.Task`` for the contract.
"""

from diptych.core.tasks.arithmetic import Arithmetic
from diptych.core.tasks.base import Task, available_tasks, get_task, register_task, split_of
from diptych.core.tasks.countdown import Countdown
from diptych.core.tasks.perm_chain import PermChain
from diptych.core.tasks.running_sum import RunningSum
from diptych.core.tasks.word_problem import WordProblem

__all__ = ["Arithmetic", "Countdown", "PermChain", "RunningSum", "Task", "WordProblem", "available_tasks", "get_task",
           "register_task", "split_of"]
