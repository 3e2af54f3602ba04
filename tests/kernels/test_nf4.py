"""NF4 (QLoRA's 4-bit base): the numpy oracle against hand-computed codes and bitsandbytes, and both
panels against the oracle.

bitsandbytes is the reference implementation of the format (it runs on CPU); its cases skip where it
is not installed. The oracle equals it bit for bit (packed bytes, absmax, dequantised floats) except
for the mean absmax subtracted before double quantisation, which bitsandbytes takes with torch's
float32 mean (an implementation-defined summation order): there the oracle is checked bit for bit
given bitsandbytes' mean, and within one step of the 8-bit code otherwise.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from diptych.kernels import reference as ref

# (shape, block size): divisible, a trailing partial block with an odd element count, a 1-D weight,
# enough blocks (520) for three second-level blocks of 256 under double quantisation, and rows that
# do not end on a block boundary.
SHAPES = [
    ((16, 128), 64), ((33, 65), 64), ((7,), 64), ((130, 256), 64), ((24, 96), 32), ((8, 512), 256), ((48, 80), 64)
]


def _weight(shape, seed=0, kind="normal"):
    rng = np.random.default_rng(seed)
    w = (rng.normal(size=shape) * 0.02).astype(np.float32)
    flat = w.reshape(-1)
    if kind == "zeros_block":  # a whole block of zeros, and a block of one repeated value
        flat[:64] = 0.0
        flat[64:128] = -0.5
    elif kind == "outlier":  # one huge value: its block is all near-zero codes but itself
        flat[min(5, flat.size - 1)] = 40.0
    elif kind == "boundaries":  # values exactly on the rounding midpoints (ties go to the lower code)
        mids = np.concatenate([ref._NF4_BOUNDS, -ref._NF4_BOUNDS, [1.0]])
        flat[: min(flat.size, mids.size)] = mids[: flat.size]
    return w


def _bnb():
    pytest.importorskip("torch")
    return pytest.importorskip("bitsandbytes.functional")


def _bnb_dequantize(packed, state) -> np.ndarray:
    """bitsandbytes' dequantised weight.

    Its CPU C kernel (bitsandbytes 0.50) serves weights with an even row length; it reads a weight of
    several rows whose row length is not a multiple of the block size with the wrong block scales (its
    error against the weight is several times NF4's). For those, and for odd row lengths (where
    bitsandbytes itself falls back to it), this takes bitsandbytes' Python reference of the op,
    unwrapped from its torch.compile (which costs half a minute and computes the same).
    """
    F = _bnb()
    import torch

    shape, bs = tuple(state.shape), state.blocksize
    if shape[-1] % 2 == 0 and (len(shape) == 1 or shape[0] == 1 or shape[-1] % bs == 0):
        return F.dequantize_4bit(packed, state).numpy()
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = F.get_4bit_type("nf4", device="cpu")
    reference = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    return reference(packed.view(-1), absmax, code, bs, shape, torch.float32).numpy()


# ---------------------------------------------------------------------------------- the oracle


def test_code_book_has_an_exact_zero_and_unit_ends():
    assert ref.NF4_CODE.shape == (16,) and ref.NF4_CODE[0] == -1.0 and ref.NF4_CODE[15] == 1.0
    assert ref.NF4_CODE[7] == 0.0 and np.all(np.diff(ref.NF4_CODE) > 0)


def test_hand_computed_codes_and_nibble_order():
    # absmax 1: 1.0 -> 15, -1.0 -> 0, 0 -> 7, 0.5 lies below the midpoint 0.50166 of 0.4407 and 0.5626 -> 12,
    # 0.51 above it -> 13, -0.05 is nearer -0.091 than 0 -> 6. Even elements take the high nibble.
    w = np.zeros(64, np.float32)
    w[:6] = [1.0, -1.0, 0.0, 0.5, 0.51, -0.05]
    q = ref.nf4_quantize(w)
    assert q.codes[:3].tolist() == [0xF0, 0x7C, 0xD6]
    assert q.absmax.tolist() == [1.0] and q.codes.shape == (32,)
    np.testing.assert_array_equal(ref.nf4_dequantize(q)[:6], ref.NF4_CODE[[15, 0, 7, 12, 13, 6]])


def test_dequantized_error_is_at_most_half_the_widest_code_gap():
    w = _weight((33, 65))
    q = ref.nf4_quantize(w)
    scale = np.repeat(q.absmax, 64)[: w.size].reshape(w.shape)
    half_gap = np.diff(ref.NF4_CODE).max() / 2
    assert np.all(np.abs(ref.nf4_dequantize(q) - w) <= half_gap * scale * (1 + 1e-6))


def test_double_quantised_absmax_is_within_half_an_8bit_step():
    w = _weight((130, 256))
    plain, dq = ref.nf4_quantize(w), ref.nf4_quantize(w, double_quant=True)
    assert dq.absmax.dtype == np.uint8 and dq.absmax_scale.shape == (3,)
    step = np.diff(ref.dynamic_map()).max() / 2
    per_block = np.repeat(dq.absmax_scale, 256)[: plain.absmax.size]
    assert np.all(np.abs(ref.nf4_absmax(dq) - plain.absmax) <= step * per_block + 1e-7)


def test_nbytes_is_under_30_percent_of_bf16():
    # codes n/2 + float32 absmax n/64 * 4 = 0.5625 n bytes (28.1% of bf16's 2n); with double quantisation
    # n/2 + n/64 + 4 * ceil(n/64/256) + 4 = 0.5159 n for this shape (25.8%).
    n = 1024 * 1024
    plain = ref.nf4_quantize(np.ones((1024, 1024), np.float32))
    dq = ref.nf4_quantize(np.ones((1024, 1024), np.float32), double_quant=True)
    assert plain.nbytes == n // 2 + 4 * n // 64
    assert dq.nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert plain.nbytes / (2 * n) == pytest.approx(0.28125)
    assert dq.nbytes / (2 * n) == pytest.approx(0.2579, abs=1e-4)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(w=np.ones((4, 64)), block_size=48), "block_size must be one of"),
        (dict(w=np.ones((4, 64), np.int32)), "floating-point"),
        (dict(w=np.full((4, 64), np.nan, np.float32)), "NaN or inf"),
        (dict(w=np.zeros((0, 64), np.float32)), "empty"),
    ],
)
def test_bad_input_gets_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        ref.nf4_quantize(**bad)


# ------------------------------------------------------------------------ oracle == bitsandbytes


def test_tables_equal_bitsandbytes():
    F = _bnb()
    np.testing.assert_array_equal(ref.NF4_CODE, F.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(ref.dynamic_map(), F.create_dynamic_map().numpy())


@pytest.mark.parametrize("kind", ["normal", "zeros_block", "outlier", "boundaries"])
@pytest.mark.parametrize("shape, block_size", SHAPES)
def test_oracle_equals_bitsandbytes_bit_for_bit(shape, block_size, kind):
    F = _bnb()
    import torch

    w = _weight(shape, kind=kind)
    packed, state = F.quantize_4bit(torch.from_numpy(w), blocksize=block_size, quant_type="nf4")
    q = ref.nf4_quantize(w, block_size)
    np.testing.assert_array_equal(q.codes, packed.numpy().reshape(-1))
    np.testing.assert_array_equal(q.absmax, state.absmax.numpy())
    np.testing.assert_array_equal(ref.nf4_dequantize(q), _bnb_dequantize(packed, state))


def test_bf16_weights_quantise_as_bitsandbytes_quantises_them():
    F = _bnb()
    import torch

    w = torch.from_numpy(_weight((33, 65))).to(torch.bfloat16)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    q = ref.nf4_quantize(w.float().numpy())
    np.testing.assert_array_equal(q.codes, packed.numpy().reshape(-1))
    np.testing.assert_array_equal(q.absmax, state.absmax.numpy())


@pytest.mark.parametrize("kind", ["normal", "zeros_block", "outlier"])
@pytest.mark.parametrize("shape, block_size", SHAPES)
def test_double_quant_equals_bitsandbytes_given_its_mean(shape, block_size, kind):
    F = _bnb()
    import torch

    w = _weight(shape, kind=kind)
    packed, state = F.quantize_4bit(
        torch.from_numpy(w), blocksize=block_size, quant_type="nf4", compress_statistics=True
    )
    plain = ref.nf4_quantize(w, block_size)
    codes, scale = ref._quantize_absmax(plain.absmax, np.float32(state.offset.item()))
    np.testing.assert_array_equal(codes, state.absmax.numpy())
    np.testing.assert_array_equal(scale, state.state2.absmax.numpy())
    np.testing.assert_array_equal(plain.codes, packed.numpy().reshape(-1))

    # With the oracle's own mean: the same 4-bit codes, the mean within a few float32 ulps, and the
    # dequantised weight within one step of the 8-bit absmax code.
    q = ref.nf4_quantize(w, block_size, double_quant=True)
    np.testing.assert_array_equal(q.codes, packed.numpy().reshape(-1))
    assert q.absmax_offset == pytest.approx(state.offset.item(), rel=1e-6)
    assert np.mean(q.absmax == state.absmax.numpy()) > 0.98
    step = np.diff(ref.dynamic_map()).max() * float(q.absmax_scale.max())
    theirs = _bnb_dequantize(packed, state)
    np.testing.assert_allclose(ref.nf4_dequantize(q), theirs, rtol=0, atol=step + 1e-7)


# ------------------------------------------------------------------------------------ torch panel


def _torch_nf4():
    pytest.importorskip("torch")
    from diptych.backends.torch import nf4

    return nf4


def _assert_same_as_oracle(got: ref.NF4Weight, want: ref.NF4Weight):
    np.testing.assert_array_equal(got.codes, want.codes)
    np.testing.assert_array_equal(got.absmax, want.absmax)
    assert got.shape == want.shape and got.block_size == want.block_size and got.double_quant == want.double_quant
    if want.double_quant:
        np.testing.assert_array_equal(got.absmax_scale, want.absmax_scale)
        assert got.absmax_offset == want.absmax_offset


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("kind", ["normal", "zeros_block", "outlier", "boundaries"])
@pytest.mark.parametrize("shape, block_size", SHAPES)
def test_torch_quantize_and_dequantize_equal_the_oracle(shape, block_size, kind, double_quant):
    nf4 = _torch_nf4()
    w = _weight(shape, kind=kind)
    want = ref.nf4_quantize(w, block_size, double_quant)
    q = nf4.quantize(w, block_size, double_quant)
    _assert_same_as_oracle(nf4.to_reference(q), want)
    np.testing.assert_array_equal(nf4.dequantize(q).numpy(), ref.nf4_dequantize(want))
    np.testing.assert_array_equal(nf4.dequantize(nf4.from_reference(want)).numpy(), ref.nf4_dequantize(want))


def test_torch_quantize_takes_a_bf16_tensor():
    nf4 = _torch_nf4()
    import torch

    w = torch.from_numpy(_weight((33, 65))).to(torch.bfloat16)
    _assert_same_as_oracle(nf4.to_reference(nf4.quantize(w, double_quant=True)),
                           ref.nf4_quantize(w.float().numpy(), double_quant=True))


@pytest.mark.parametrize("double_quant", [False, True])
def test_torch_linear_nf4_equals_the_dequantised_matmul_and_its_gradient(double_quant):
    nf4 = _torch_nf4()
    import torch

    w = _weight((48, 80), seed=1)
    q = nf4.quantize(w, double_quant=double_quant)
    dense = torch.from_numpy(ref.nf4_dequantize(ref.nf4_quantize(w, double_quant=double_quant)))
    x = torch.randn(2, 3, 80, dtype=torch.float32, requires_grad=True, generator=torch.Generator().manual_seed(0))
    bias = torch.linspace(-1, 1, 48)
    g = torch.randn(2, 3, 48, generator=torch.Generator().manual_seed(1))
    y = nf4.linear_nf4(x, q, bias)
    torch.testing.assert_close(y, x @ dense.T + bias, rtol=1e-6, atol=1e-6)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g @ dense, rtol=1e-6, atol=1e-6)


def test_torch_linear_nf4_keeps_no_dense_weight_for_backward():
    nf4 = _torch_nf4()
    import torch

    q = nf4.quantize(_weight((48, 80)))
    x = torch.randn(4, 80, requires_grad=True)

    def saved_sizes(forward):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            forward().sum().backward()
        return sizes

    assert 48 * 80 not in saved_sizes(lambda: nf4.linear_nf4(x, q))
    assert 48 * 80 in saved_sizes(lambda: torch.nn.functional.linear(x, nf4.dequantize(q)))  # the naive path


@pytest.mark.parametrize("double_quant", [False, True])
def test_torch_bnb_path_equals_the_project_path(double_quant):
    _bnb()
    nf4 = _torch_nf4()
    import torch

    q = nf4.quantize(_weight((48, 128), seed=2), double_quant=double_quant)
    x = torch.randn(5, 128, requires_grad=True, generator=torch.Generator().manual_seed(0))
    bias = torch.linspace(-1, 1, 48)
    ours, theirs = nf4.linear_nf4(x, q, bias), nf4.linear_nf4(x, q, bias, impl="bnb")
    # bitsandbytes' own storage precision bounds the difference; on CPU it is the same float32 matmul.
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    g = torch.randn(5, 48, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.autograd.grad(theirs, x, g)[0], torch.autograd.grad(ours, x, g)[0],
                               rtol=1e-5, atol=1e-5)


def test_torch_nbytes_and_errors():
    nf4 = _torch_nf4()
    import torch

    w = np.ones((256, 256), np.float32)
    assert nf4.nbytes(nf4.quantize(w)) == ref.nf4_quantize(w).nbytes
    assert nf4.nbytes(nf4.quantize(w, double_quant=True)) == ref.nf4_quantize(w, double_quant=True).nbytes
    with pytest.raises(ValueError, match="floating-point"):
        nf4.quantize(torch.ones(4, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN or inf"):
        nf4.quantize(torch.full((4, 64), float("inf")))
    with pytest.raises(ValueError, match="impl must be one of"):
        nf4.linear_nf4(torch.ones(2, 256), nf4.quantize(w), impl="fast")
    with pytest.raises(ValueError, match="2-D weight"):
        nf4.linear_nf4(torch.ones(2, 255), nf4.quantize(w))
    if importlib.util.find_spec("bitsandbytes") is not None:
        with pytest.raises(ValueError, match="multiple of block_size"):
            nf4.linear_nf4(torch.ones(2, 80), nf4.quantize(np.ones((48, 80), np.float32)), impl="bnb")


# -------------------------------------------------------------------------------------- JAX panel


def _jax_nf4():
    pytest.importorskip("jax")
    from diptych.backends.jax import nf4

    return nf4


# JAX compiles per shape: a few shapes only (divisible, partial odd tail, three second-level blocks).
JAX_SHAPES = [((16, 128), 64), ((33, 65), 64), ((130, 256), 64)]


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape, block_size", JAX_SHAPES)
def test_jax_quantize_and_dequantize_equal_the_oracle(shape, block_size, double_quant):
    nf4 = _jax_nf4()
    import jax

    w = _weight(shape, kind="zeros_block" if shape[0] > 16 else "boundaries")
    want = ref.nf4_quantize(w, block_size, double_quant)
    q = nf4.quantize(w, block_size, double_quant)
    _assert_same_as_oracle(nf4.to_reference(q), want)
    dense = ref.nf4_dequantize(want)
    np.testing.assert_array_equal(np.asarray(nf4.dequantize(q)), dense)
    np.testing.assert_array_equal(np.asarray(nf4.dequantize(nf4.from_reference(want))), dense)
    # Under jit XLA may fuse the double-quantised scale's multiply-add into one FMA: one ulp on the block
    # scale, two on the weight after the rounding of code * scale.
    jitted = np.asarray(jax.jit(nf4.dequantize)(q))
    if double_quant:
        np.testing.assert_allclose(jitted, dense, rtol=2 * 2.0**-23, atol=0)
    else:
        np.testing.assert_array_equal(jitted, dense)


def test_jax_linear_nf4_equals_the_dequantised_matmul_and_its_gradient():
    nf4 = _jax_nf4()
    import jax
    import jax.numpy as jnp

    w = _weight((48, 80), seed=1)
    q = nf4.quantize(w)
    dense = ref.nf4_dequantize(ref.nf4_quantize(w))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 80)).astype(np.float32)
    g = rng.normal(size=(2, 3, 48)).astype(np.float32)
    bias = np.linspace(-1, 1, 48, dtype=np.float32)
    y, vjp = jax.vjp(lambda x_: jax.jit(nf4.linear_nf4)(x_, q, jnp.asarray(bias)), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), x @ dense.T + bias, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), g @ dense, rtol=1e-6, atol=1e-6)


def test_jax_gradient_keeps_no_dense_weight_between_forward_and_backward():
    """XLA would keep each layer's dequantised weight from the forward for the backward (one dense weight per
    layer, what a dense base costs); linear_nf4 dequantises again in the backward, so the compiled gradient's
    scratch memory stays near one weight plus activations, not one weight per layer."""
    nf4 = _jax_nf4()
    import jax
    import jax.numpy as jnp

    layers, h = 12, 512
    rng = np.random.default_rng(0)
    qs = [nf4.quantize((rng.normal(size=(h, h)) * 0.02).astype(np.float32)) for _ in range(layers)]
    x = jnp.asarray(rng.normal(size=(64, h)).astype(np.float32))

    def loss(x_, qs_):
        for q in qs_:
            x_ = jnp.tanh(nf4.linear_nf4(x_, q))
        return x_.sum()

    temp = jax.jit(jax.grad(loss)).lower(x, qs).compile().memory_analysis().temp_size_in_bytes
    assert temp < 0.6 * layers * (h * h * 4), temp / (h * h * 4)


def test_jax_nbytes_and_errors():
    nf4 = _jax_nf4()
    import jax.numpy as jnp

    w = np.ones((256, 256), np.float32)
    q = nf4.quantize(w)
    assert nf4.nbytes(q) == ref.nf4_quantize(w).nbytes
    with pytest.raises(ValueError, match="floating-point"):
        nf4.quantize(jnp.ones((4, 64), jnp.int32))
    with pytest.raises(ValueError, match="2-D weight"):
        nf4.linear_nf4(jnp.ones((2, 255)), q)
