"""Registers the recurrent-depth parity suite; its cases live in ``diptych.recurrent.parity_suite``."""

from diptych.parity.harness import register_suite
from diptych.recurrent.parity_suite import register

register(register_suite)
