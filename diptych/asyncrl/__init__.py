"""Asynchronous RL (Magistral-style): generators that never wait, bounded staleness, per-token versions.

``config`` (the ``async:`` block), ``groups`` (what travels: whole groups with per-token versions), ``roles``
(the generator loop, batch or continuous), ``queues`` (slots and scored groups), ``placement`` (thread, process
with shared-memory weights), ``ray_placement`` (Ray actors), ``orchestrator`` (the trainer's loop). docs/async_rl.md.
"""

from diptych.asyncrl.config import AsyncConfig, AsyncConfigError

__all__ = ["AsyncConfig", "AsyncConfigError"]
