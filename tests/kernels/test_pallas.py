"""Pallas kernels in interpret mode (chosen automatically on CPU) against the numpy oracle, and the
twins against each other.

Shapes (37 tokens, hidden 48, vocab 300) divide none of the block sizes (16 / 64 / 32).
"""

from __future__ import annotations

import numpy as np
import pytest

from diptych.kernels import reference as ref
from tests.conftest import needs_jax, needs_triton
from tests.kernels.test_chunked import _bf16_round, _case, assert_matches_oracle, run_jax, run_torch

pytestmark = needs_jax


# The interpreter traces every kernel anew (~5 s a call), so the float32 / temperature 0.8 case
# lives in the cross-twin test below.
@pytest.mark.parametrize(("dtype", "temperature"), [("float32", 1.0), ("bfloat16", 0.6)])
def test_fused_logprobs_forward_and_backward_match_numpy(dtype, temperature):
    h, w, y, g_lp, g_ent = _case()
    got = run_jax("fused", h, w, y, temperature, g_lp, g_ent, dtype)
    if dtype == "bfloat16":
        h, w = _bf16_round(h), _bf16_round(w)
    assert_matches_oracle(got, h, w, y, temperature, g_lp, g_ent, dtype)


def test_fused_logprobs_jit_traced_temperature_other_blocks_and_only_logp_used():
    import jax
    import jax.numpy as jnp

    from diptych.kernels.pallas.logprobs import fused_selective_logprobs

    h, w, y, g_lp, _ = _case(4)
    h, w, y, g_lp = h[:21], w[:130], y[:21] % 130, g_lp[:21]

    @jax.jit
    def objective(a, b, t):
        lp, _ = fused_selective_logprobs(a, b, jnp.asarray(y), t, blocks=(32, 128, 16))
        return jnp.sum(lp * g_lp), lp

    (_, lp), (dh, dw) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(jnp.asarray(h), jnp.asarray(w),
                                                                         jnp.float32(1.3))
    want_dh, want_dw = ref.selective_logprobs_backward(h, w, y, 1.3, g_lp, None)
    np.testing.assert_allclose(np.asarray(lp), ref.selective_logprobs(h, w, y, 1.3)[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(dh), want_dh, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), want_dw, atol=1e-5)


def test_bad_block_sizes_are_refused():
    import jax.numpy as jnp

    from diptych.kernels.pallas.logprobs import fused_selective_logprobs

    h, w, y, _, _ = _case()
    with pytest.raises(ValueError, match="powers of two >= 16"):
        fused_selective_logprobs(jnp.asarray(h), jnp.asarray(w), jnp.asarray(y), blocks=(16, 100, 16))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_rms_norm_forward_and_backward_match_numpy(dtype):
    import jax
    import jax.numpy as jnp

    from diptych.backends.jax.kernels import rms_norm

    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 7, 40)).astype(np.float32)
    wgt = (1 + 0.1 * rng.normal(size=40)).astype(np.float32)
    go = rng.normal(size=x.shape).astype(np.float32)
    xj, wj = jnp.asarray(x, dtype), jnp.asarray(wgt, dtype)
    out, vjp = jax.vjp(lambda a, b: rms_norm(a, b, 1e-5, kernels="fused"), xj, wj)
    assert out.dtype == jnp.dtype(dtype)
    dx, dw = vjp(jnp.asarray(go, dtype))
    if dtype == "bfloat16":
        x, wgt, go = _bf16_round(x), _bf16_round(wgt), _bf16_round(go)
        # Hugging Face's rounding points, reproduced exactly by the kernel.
        assert bool(jnp.all(out == rms_norm(xj, wj, 1e-5, kernels="reference")))
    tol = 1e-5 if dtype == "float32" else 1e-2
    want_dx, want_dw = ref.rms_norm_backward(x, wgt, 1e-5, go)
    for got, want in ((out, ref.rms_norm(x, wgt, 1e-5)), (dx, want_dx), (dw, want_dw)):
        got = np.asarray(got.astype(jnp.float32))
        assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max())


@needs_triton
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_pallas_triton_and_reference_agree_on_the_same_inputs(dtype):
    h, w, y, g_lp, g_ent = _case(7)
    pallas = run_jax("fused", h, w, y, 0.8, g_lp, g_ent, dtype)
    triton = run_torch("fused", h, w, y, 0.8, g_lp, g_ent, dtype)
    if dtype == "bfloat16":
        h, w = _bf16_round(h), _bf16_round(w)
    assert_matches_oracle(pallas, h, w, y, 0.8, g_lp, g_ent, dtype)
    assert_matches_oracle(triton, h, w, y, 0.8, g_lp, g_ent, dtype)
    tol = 1e-5 if dtype == "float32" else 1e-2
    for name, a, b in zip(("logp", "entropy", "dh", "dW"), pallas, triton):
        assert np.abs(a - b).max() <= tol * max(1.0, np.abs(a).max()), name
