"""Asynchronous RL (Magistral-style): generators that never wait, bounded staleness, per-token versions."""

from diptych.asyncrl.config import AsyncConfig

__all__ = ["AsyncConfig"]
