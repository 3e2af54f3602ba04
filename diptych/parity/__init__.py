"""Cross-backend parity: the proof that a result on one stack holds on the other."""

from diptych.parity.harness import TOLERANCES, Case, Report, compare, register_suite, run_parity

__all__ = ["TOLERANCES", "Case", "Report", "compare", "register_suite", "run_parity"]
