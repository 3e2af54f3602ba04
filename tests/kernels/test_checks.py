"""The kernels' shared input checks: one message on every backend, and a traced temperature let through."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.kernels.checks import check_selective_logprobs_inputs as check
from tests.conftest import needs_jax


def test_bad_inputs_name_what_to_pass():
    h, w, y = np.zeros((3, 4)), np.zeros((10, 4)), np.zeros(3, np.int64)
    check(h, w, y, 1.0, 16)  # good inputs pass
    with pytest.raises(ValueError, match="not its transpose"):
        check(h, w.T, y, 1.0, 16)
    with pytest.raises(ValueError, match=r"leading shape \(3,\); got \(2,\)"):
        check(h, w, y[:2], 1.0, 16)
    with pytest.raises(ValueError, match=r"temperature must be > 0; got 0\.0"):
        check(h, w, y, 0.0, 16)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        check(h, w, y, np.float32(-1.0), 16)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        check(h, w, y, 1.0, 0)


@needs_jax
def test_traced_temperature_is_not_concretised():
    import jax
    import jax.numpy as jnp

    from diptych.backends.jax.kernels import selective_logprobs

    h, w, y = jnp.ones((3, 4)), jnp.zeros((10, 4)), jnp.array([0, 4, 9])
    logp, _ = jax.jit(lambda t: selective_logprobs(h, w, y, t, kernels="chunked"))(jnp.float32(0.5))
    np.testing.assert_allclose(np.asarray(logp), -np.log(10.0), rtol=1e-6)
