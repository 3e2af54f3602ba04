"""The plain chunked paths and the naive reference paths of both backends against the numpy oracle.

Shapes are chosen so that no size divides the chunk size; bf16 inputs are compared with the
oracle evaluated on the same bf16-rounded values.
"""

from __future__ import annotations

import numpy as np
import pytest

from diptych.kernels import reference as ref
from tests.conftest import needs_jax, needs_torch

N, H, V = 37, 48, 300


def _case(seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(N, H)).astype(np.float32)
    w = (rng.normal(size=(V, H)) * 0.3).astype(np.float32)
    y = rng.integers(0, V, size=N)
    g_lp = rng.normal(size=N).astype(np.float32)
    g_ent = rng.normal(size=N).astype(np.float32)
    return h, w, y, g_lp, g_ent


def _bf16_round(a):
    import ml_dtypes

    return a.astype(ml_dtypes.bfloat16).astype(np.float32)


def run_jax(mode, h, w, y, temperature, g_lp, g_ent, dtype="float32", chunk_size=16):
    import jax
    import jax.numpy as jnp

    from diptych.backends.jax.kernels import selective_logprobs

    hj, wj = jnp.asarray(h, dtype), jnp.asarray(w, dtype)
    yj = jnp.asarray(y, jnp.int32)

    def objective(h_, w_):
        lp, e = selective_logprobs(h_, w_, yj, temperature, kernels=mode, chunk_size=chunk_size)
        return jnp.sum(lp * g_lp) + jnp.sum(e * g_ent), (lp, e)

    (_, (lp, e)), (dh, dw) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(hj, wj)
    assert lp.dtype == jnp.float32 and e.dtype == jnp.float32
    assert dh.dtype == hj.dtype and dw.dtype == wj.dtype
    return [np.asarray(jnp.asarray(a, jnp.float32)) for a in (lp, e, dh, dw)]


def run_torch(mode, h, w, y, temperature, g_lp, g_ent, dtype="float32", chunk_size=16):
    import torch

    from diptych.backends.torch.kernels import selective_logprobs

    ht = torch.tensor(h).to(getattr(torch, dtype)).requires_grad_()
    wt = torch.tensor(w).to(getattr(torch, dtype)).requires_grad_()
    lp, e = selective_logprobs(ht, wt, torch.tensor(y), temperature, kernels=mode, chunk_size=chunk_size)
    assert lp.dtype == torch.float32 and e.dtype == torch.float32
    ((lp * torch.tensor(g_lp)).sum() + (e * torch.tensor(g_ent)).sum()).backward()
    assert ht.grad.dtype == ht.dtype and wt.grad.dtype == wt.dtype
    return [a.detach().float().numpy() for a in (lp, e, ht.grad, wt.grad)]


def assert_matches_oracle(got, h, w, y, temperature, g_lp, g_ent, dtype):
    want_lp, want_e = ref.selective_logprobs(h, w, y, temperature)
    want_dh, want_dw = ref.selective_logprobs_backward(h, w, y, temperature, g_lp, g_ent)
    tol = 1e-5 if dtype == "float32" else 1e-2
    for name, g, wnt in zip(("logp", "entropy", "dh", "dW"), got, (want_lp, want_e, want_dh, want_dw)):
        scale = max(1.0, float(np.abs(wnt).max()))
        err = float(np.abs(g - wnt).max())
        assert err <= tol * scale, f"{name}: max abs err {err:.3g} > {tol} x scale {scale:.3g}"


BACKEND_NAMES = [pytest.param("jax", marks=needs_jax), pytest.param("torch", marks=needs_torch)]
RUNNERS = [pytest.param(run_jax, marks=needs_jax, id="jax"), pytest.param(run_torch, marks=needs_torch, id="torch")]


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("mode", ["chunked", "reference"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_forward_and_backward_match_numpy(runner, mode, dtype, temperature):
    h, w, y, g_lp, g_ent = _case()
    got = runner(mode, h, w, y, temperature, g_lp, g_ent, dtype)
    if dtype == "bfloat16":
        h, w = _bf16_round(h), _bf16_round(w)
    assert_matches_oracle(got, h, w, y, temperature, g_lp, g_ent, dtype)


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("chunk_size", [1, 5, 37, 4096])
def test_chunk_size_does_not_change_the_result(runner, chunk_size):
    h, w, y, g_lp, g_ent = _case(1)
    got = runner("chunked", h, w, y, 1.0, g_lp, g_ent, chunk_size=chunk_size)
    assert_matches_oracle(got, h, w, y, 1.0, g_lp, g_ent, "float32")


@needs_jax
def test_jax_chunked_is_jittable_and_takes_batch_shapes():
    import jax
    import jax.numpy as jnp

    from diptych.backends.jax.kernels import selective_logprobs

    h, w, y, _, _ = _case(2)
    f = jax.jit(lambda a, b, c: selective_logprobs(a, b, c, 0.9, kernels="chunked", chunk_size=8))
    lp, e = f(jnp.asarray(h[:36].reshape(4, 9, H)), jnp.asarray(w), jnp.asarray(y[:36].reshape(4, 9)))
    want_lp, want_e = ref.selective_logprobs(h[:36], w, y[:36], 0.9)
    assert lp.shape == (4, 9)
    np.testing.assert_allclose(np.asarray(lp).reshape(-1), want_lp, atol=1e-5)
    np.testing.assert_allclose(np.asarray(e).reshape(-1), want_e, atol=1e-5)


@pytest.mark.parametrize("backend_name", BACKEND_NAMES)
def test_bad_arguments_raise_clear_errors(backend_name):
    h, w, y, _, _ = _case()
    if backend_name == "jax":
        import jax.numpy as jnp

        from diptych.backends.jax.kernels import rms_norm, selective_logprobs
        h, w, y = jnp.asarray(h), jnp.asarray(w), jnp.asarray(y)
    else:
        import torch

        from diptych.backends.torch.kernels import rms_norm, selective_logprobs
        h, w, y = torch.tensor(h), torch.tensor(w), torch.tensor(y)
    with pytest.raises(ValueError, match="not one of"):
        selective_logprobs(h, w, y, kernels="fast")
    with pytest.raises(ValueError, match="transpose"):
        selective_logprobs(h, w.T, y)
    with pytest.raises(ValueError, match="leading shape"):
        selective_logprobs(h, w, y[:-1])
    with pytest.raises(ValueError, match="temperature"):
        selective_logprobs(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="rms_norm weight"):
        rms_norm(h, w[0, :5], 1e-6)


@needs_torch
def test_torch_fused_without_cuda_or_interpreter_says_what_to_do(monkeypatch):
    from diptych.backends.torch.kernels import resolve_kernels

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="kernels='chunked'"):
        resolve_kernels("fused", "cpu")
    assert resolve_kernels("auto", "cpu") == "chunked"


@pytest.mark.parametrize("backend_name", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plain_rms_norm_matches_numpy(backend_name, dtype):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 3, 40)).astype(np.float32)
    wgt = rng.normal(size=40).astype(np.float32)
    if backend_name == "jax":
        import jax.numpy as jnp

        from diptych.backends.jax.kernels import rms_norm
        out = np.asarray(rms_norm(jnp.asarray(x, dtype), jnp.asarray(wgt, dtype), 1e-6, "chunked").astype(jnp.float32))
    else:
        import torch

        from diptych.backends.torch.kernels import rms_norm
        dt = getattr(torch, dtype)
        out = rms_norm(torch.tensor(x).to(dt), torch.tensor(wgt).to(dt), 1e-6, "chunked").float().numpy()
    if dtype == "bfloat16":
        x, wgt = _bf16_round(x), _bf16_round(wgt)
    want = ref.rms_norm(x, wgt, 1e-6)
    tol = 1e-5 if dtype == "float32" else 1e-2
    assert np.abs(out - want).max() <= tol * max(1.0, np.abs(want).max())


@needs_jax
def test_jax_auto_resolves_to_chunked_on_cpu():
    from diptych.backends.jax.kernels import resolve_kernels

    assert resolve_kernels("auto") == "chunked"
    assert resolve_kernels(None) == "chunked"
    assert resolve_kernels("fused") == "fused"


@needs_jax
@pytest.mark.parametrize("mode", ["chunked", "reference"])
def test_jax_temperature_may_be_traced(mode):
    import jax
    import jax.numpy as jnp

    from diptych.backends.jax.kernels import selective_logprobs

    h, w, y, g_lp, g_ent = _case(3)

    @jax.jit
    def objective(a, b, t):
        lp, e = selective_logprobs(a, b, jnp.asarray(y), t, kernels=mode, chunk_size=16)
        return jnp.sum(lp * g_lp) + jnp.sum(e * g_ent), (lp, e)

    (_, (lp, e)), (dh, dw) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        jnp.asarray(h), jnp.asarray(w), jnp.float32(0.7))
    got = [np.asarray(a) for a in (lp, e, dh, dw)]
    assert_matches_oracle(got, h, w, y, 0.7, g_lp, g_ent, "float32")


@needs_jax
def test_jax_chunked_never_allocates_the_full_logits():
    """XLA's own allocation plan: the chunked step's temporaries stay far below one [N, V] buffer."""
    import jax
    import jax.numpy as jnp

    from diptych.backends.jax.kernels import selective_logprobs

    n, hd, v = 2048, 32, 4096  # one [N, V] float32 buffer is 32 MiB; a [128, V] chunk is 2 MiB

    def temp_bytes(mode):
        def step(a, b, c):
            lp, e = selective_logprobs(a, b, c, 1.0, kernels=mode, chunk_size=128)
            return jnp.sum(lp) + jnp.sum(e)

        args = (jnp.zeros((n, hd)), jnp.zeros((v, hd)), jnp.zeros((n,), jnp.int32))
        return jax.jit(jax.grad(step, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes

    full_logits = n * v * 4
    assert temp_bytes("reference") >= full_logits
    assert temp_bytes("chunked") <= full_logits // 4


@needs_torch
def test_torch_chunked_saves_nothing_of_vocabulary_size_for_backward():
    """Autograd's saved tensors: the naive path keeps [N, V] buffers, the chunked one none."""
    import torch

    from diptych.backends.torch.kernels import selective_logprobs

    n, hd, v = 256, 16, 1024
    h, w = torch.randn(n, hd, requires_grad=True), torch.randn(v, hd, requires_grad=True)
    y = torch.randint(0, v, (n,))

    def largest_saved(mode):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lp, e = selective_logprobs(h, w, y, 1.0, kernels=mode, chunk_size=32)
        (lp.sum() + e.sum()).backward()
        return max(sizes)

    assert largest_saved("reference") >= n * v
    assert largest_saved("chunked") <= max(n * hd, v * hd)
