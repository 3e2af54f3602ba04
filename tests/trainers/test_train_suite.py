"""The `train` parity suite: a GRPO step on fixed rollouts and a DPO step agree on JAX and torch
(loss, gradients, updated weights) after 1 and 10 updates, and it joins `diptych parity`."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HAS_JAX, HAS_TORCH

from diptych.core.spec import tiny_spec

pytestmark = pytest.mark.skipif(not (HAS_JAX and HAS_TORCH), reason="needs both backends")

SPEC = dict(vocab_size=64, hidden_size=32, intermediate_size=64)


@pytest.fixture(scope="module")
def report():
    import diptych.parity.train_suite  # noqa: F401  (registers the suite)
    from diptych.parity.harness import run_parity

    return run_parity(tiny_spec("llama", **SPEC), suites=["train"], with_transformers=False)


def test_grpo_and_dpo_steps_match_across_backends_after_1_and_10_steps(report):
    got = {c.quantity for c in report.cases}
    assert {"grads:grpo step 1", "grads:dpo step 1"} <= got
    assert {"loss:grpo step 1", "loss:grpo step 10", "loss:dpo step 1", "loss:dpo step 10",
            "weights:grpo after 1", "weights:grpo after 10", "weights:dpo after 1", "weights:dpo after 10"} <= got
    failed = [(c.quantity, c.max_rel) for c in report.cases if not c.passed]
    assert report.passed, failed
    for c in report.cases:
        assert c.tol == {"grads": 1e-4, "loss": 1e-4, "weights": 1e-4}[c.quantity.split(":")[0]]


def test_the_cases_are_not_vacuous():
    """The GRPO loss is non-zero on-policy and the weights really move, so agreement means something."""
    from diptych.core.backend import get_backend
    from diptych.parity.train_suite import run_case

    spec = tiny_spec("llama", **SPEC)
    w0 = spec.init_weights(0)
    out = run_case("grpo", get_backend("torch"), spec, w0, "float32")
    assert abs(float(out["loss@1"])) > 1e-3
    start = np.concatenate([np.asarray(w0[k], np.float64).ravel() for k in sorted(w0)])
    moved = np.abs(out["weights@10"] - start).max()
    assert moved > 1e-4  # ten Adam steps at lr 1e-4 move weights by ~1e-3


def test_a_skewed_update_fails_the_comparison(report):
    from diptych.parity.harness import compare

    x = np.linspace(-1.0, 1.0, 100)
    assert compare("weights:grpo after 10", "a", "b", x + 1e-6, x, "float32").passed
    assert not compare("weights:grpo after 10", "a", "b", x + 1e-3, x, "float32").passed


def test_parity_cli_imports_the_train_suite():
    from diptych.parity.cli import SUITE_MODULES

    assert "diptych.parity.train_suite" in SUITE_MODULES
