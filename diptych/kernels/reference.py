"""Numpy references for every kernel: the one oracle both twins (Pallas, Triton) are tested against.

Everything is computed in float64 from float32 copies of the inputs so that the reference is
more accurate than any kernel under test; a bf16 input is compared after the kernel's own
rounding of its inputs (callers pass the bf16-rounded values as float32).

Selective log-probs fused with the LM head: for hidden states ``h [N, H]``, output weight
``W [V, H]``, targets ``y [N]`` and temperature ``tau``,

    z = h @ W.T / tau,   logp = z[y] - logsumexp(z),   entropy = -sum(softmax(z) * log_softmax(z)).

With upstream gradients ``g_lp`` and ``g_ent`` the logit gradient is

    dz = g_lp * (onehot(y) - p) - g_ent * p * (log p + entropy),      d(h @ W.T) = dz / tau,

and ``dh = dlogits @ W``, ``dW = dlogits.T @ h``.

NF4 (QLoRA's 4-bit NormalFloat base weights) is bitsandbytes' format, transcribed so that the torch
and JAX panels can be checked against one numpy text and bitsandbytes against it: see
``nf4_quantize``.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

__all__ = [
    "NF4_BLOCK_SIZES",
    "NF4_CODE",
    "NF4Weight",
    "dynamic_lut",
    "dynamic_map",
    "nf4_absmax",
    "nf4_dequantize",
    "nf4_quantize",
    "rms_norm",
    "rms_norm_backward",
    "selective_logprobs",
    "selective_logprobs_backward",
]


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def _check_logprob_inputs(h: np.ndarray, w: np.ndarray, targets: np.ndarray) -> None:
    if h.ndim != 2 or w.ndim != 2 or h.shape[1] != w.shape[1]:
        raise ValueError(
            f"selective_logprobs wants hidden [N, H] and weight [V, H] with the same H; got hidden "
            f"{tuple(h.shape)} and weight {tuple(w.shape)} (pass lm_head.weight, not its transpose)."
        )
    if targets.shape != (h.shape[0],):
        raise ValueError(f"targets must have shape [N] = ({h.shape[0]},); got {tuple(targets.shape)}.")
    if targets.size and (targets.min() < 0 or targets.max() >= w.shape[0]):
        raise ValueError(f"targets must lie in [0, {w.shape[0]}); got range [{targets.min()}, {targets.max()}].")


def _softmax_stats(h: np.ndarray, w: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    z = _f64(h) @ _f64(w).T / float(temperature)
    m = z.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=-1))
    return z, lse


def selective_logprobs(
    h: np.ndarray, w: np.ndarray, targets: np.ndarray, temperature: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-token log-prob of the target and entropy of ``softmax(h @ W.T / temperature)`` (float64)."""
    targets = np.asarray(targets)
    _check_logprob_inputs(np.asarray(h), np.asarray(w), targets)
    z, lse = _softmax_stats(h, w, temperature)
    logp_all = z - lse[:, None]
    logp = np.take_along_axis(logp_all, targets[:, None].astype(np.int64), axis=-1)[:, 0]
    entropy = -(np.exp(logp_all) * logp_all).sum(axis=-1)
    return logp, entropy


def selective_logprobs_backward(
    h: np.ndarray,
    w: np.ndarray,
    targets: np.ndarray,
    temperature: float,
    grad_logp: np.ndarray,
    grad_entropy: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gradients ``(dh [N, H], dW [V, H])`` of ``sum(grad_logp * logp + grad_entropy * entropy)``."""
    targets = np.asarray(targets)
    _check_logprob_inputs(np.asarray(h), np.asarray(w), targets)
    z, lse = _softmax_stats(h, w, temperature)
    logp_all = z - lse[:, None]
    p = np.exp(logp_all)
    entropy = -(p * logp_all).sum(axis=-1)
    g_lp = _f64(grad_logp)[:, None]
    g_ent = np.zeros_like(g_lp) if grad_entropy is None else _f64(grad_entropy)[:, None]
    onehot = np.zeros_like(z)
    onehot[np.arange(z.shape[0]), targets.astype(np.int64)] = 1.0
    dz = g_lp * (onehot - p) - g_ent * p * (logp_all + entropy[:, None])
    dlogits = dz / float(temperature)
    return dlogits @ _f64(w), dlogits.T @ _f64(h)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last axis (float64)."""
    x64 = _f64(x)
    rstd = 1.0 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + eps)
    return x64 * rstd * _f64(weight)


def rms_norm_backward(
    x: np.ndarray, weight: np.ndarray, eps: float, grad_out: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Gradients ``(dx, dweight)`` of ``sum(grad_out * rms_norm(x, weight, eps))``.

    With ``xhat = x * rstd`` and ``g = grad_out * weight``: ``dx = rstd * (g - xhat * mean(g * xhat))``
    and ``dweight = sum over rows of grad_out * xhat``.
    """
    x64, w64, go = _f64(x), _f64(weight), _f64(grad_out)
    rstd = 1.0 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + eps)
    xhat = x64 * rstd
    g = go * w64
    dx = rstd * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    dw = (go * xhat).reshape(-1, x64.shape[-1]).sum(axis=0)
    return dx, dw


# ----------------------------------------------------------------------------------------------
# NF4: bitsandbytes' 4-bit NormalFloat blockwise quantisation (QLoRA, Dettmers et al. 2023).
#
# Transcribed from bitsandbytes 0.50 (`functional.get_4bit_type("nf4")`, `functional.quantize_4bit`,
# the default `quantize_4bit` op in `backends/default/ops.py`, the CPU `quantize_blockwise` kernel
# (`quantize_cpu_impl` in `csrc/cpu_ops.cpp`) for the double-quantised absmax, `functional.create_dynamic_map`).
# ----------------------------------------------------------------------------------------------

# The 16 NormalFloat4 values: quantiles of N(0, 1) normalised to [-1, 1] with an exact zero
# (bitsandbytes `get_4bit_type("nf4")`, generated by `create_normal_map(offset=0.9677083)`).
NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip
# Rounding boundaries: midpoints of neighbouring codes in float32, as bitsandbytes' bucketize uses them.
_NF4_BOUNDS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)
_NF4_ZERO = 7  # index of 0.0: the nibble bitsandbytes pads an odd element count with
NF4_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts
DOUBLE_QUANT_BLOCK = 256  # bitsandbytes quantises the absmax in blocks of 256 (`compress_statistics=True`)
# torch.clamp(min=1e-38) in bitsandbytes: the float32 nearest 1e-38 (a subnormal).
_ABSMAX_FLOOR = np.float32(1e-38)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    # torch.linspace's float32 CPU rule: the first half counted up from start, the second half down
    # from end, each point one fused multiply-add (rounded once; the float64 product of a float32 step
    # and a small integer is exact), so the dynamic map below equals bitsandbytes' bit for bit.
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    idx = np.arange(steps, dtype=np.float64)
    up = np.float64(start32) + step * idx
    down = np.float64(end32) - step * (steps - 1 - idx)
    return np.where(idx < steps // 2, up, down).astype(np.float32)


@functools.cache
def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic code book (``create_dynamic_map()``): 256 sorted float32 values.

    It quantises the per-block absmax when double quantisation is on. (Cached and read-only.)
    """
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        boundaries = _torch_linspace_f32(0.1, 1.0, 2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        means = ((boundaries[:-1] + boundaries[1:]) / np.float32(2.0)).astype(np.float32)
        scale = np.float32(10 ** (-(max_exponent_bits - 1) + i))
        data += (means * scale).astype(np.float32).tolist()
        data += (means * -scale).astype(np.float32).tolist()
    data += [0.0, 1.0]
    table = np.array(sorted(data), dtype=np.float32)
    table.flags.writeable = False
    return table


@dataclasses.dataclass(frozen=True, eq=False)
class NF4Weight:
    """A weight stored as NF4: two 4-bit codes per byte and one scale per block of ``block_size`` values.

    Blocks run over the row-major flattened weight (a trailing partial block gets its own scale);
    byte ``i`` holds element ``2i`` in its high nibble and ``2i + 1`` in its low nibble (an odd count
    is padded with the code of 0.0). Without double quantisation ``absmax`` is float32 [blocks];
    with it ``absmax`` is uint8 [blocks], codes of ``dynamic_map()`` scaled by ``absmax_scale``
    (float32, one per 256 blocks) and shifted by ``absmax_offset`` (float32, the mean absmax).
    """

    codes: np.ndarray
    absmax: np.ndarray
    shape: tuple[int, ...]
    block_size: int = 64
    double_quant: bool = False
    absmax_scale: np.ndarray | None = None
    absmax_offset: float = 0.0  # a float32 value, held as a Python float

    @property
    def num_blocks(self) -> int:
        return -(-int(np.prod(self.shape)) // self.block_size)

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes + block scales (+ the second-level scales and offset)."""
        total = self.codes.nbytes + self.absmax.nbytes
        if self.double_quant:
            total += self.absmax_scale.nbytes + 4
        return int(total)


def _check_nf4_input(w: np.ndarray, block_size: int) -> np.ndarray:
    if block_size not in NF4_BLOCK_SIZES:
        raise ValueError(f"NF4 block_size must be one of {NF4_BLOCK_SIZES} (as in bitsandbytes); got {block_size}.")
    w = np.asarray(w)
    if w.dtype.kind != "f" and w.dtype.name != "bfloat16":
        raise ValueError(f"NF4 quantises floating-point weights; got dtype {w.dtype}. Cast the weight to float32.")
    if w.size == 0:
        raise ValueError(f"NF4 cannot quantise an empty weight (shape {tuple(w.shape)}).")
    w = w.astype(np.float32)
    if not np.isfinite(w).all():
        raise ValueError(
            f"NF4 cannot quantise a weight with NaN or inf ({int((~np.isfinite(w)).sum())} of {w.size} values); "
            "fix the checkpoint first."
        )
    return w


_LUT_SIZE = 65536


@functools.cache
def dynamic_lut() -> np.ndarray:
    """bitsandbytes' CPU 8-bit quantiser's lookup table: [-1, 1] in 65536 even steps -> nearest dynamic code.

    (``build_quantize_lut`` in bitsandbytes' ``csrc/cpu_ops.cpp``: midpoints in float32, a step
    ``-1 + 2i / 65535``, and the first code whose upper midpoint is not below it.)
    """
    code = dynamic_map()
    midpoints = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    steps = (np.float32(-1.0) + (np.float32(2.0) * np.arange(_LUT_SIZE, dtype=np.float32)) / np.float32(65535))
    lut = np.searchsorted(midpoints, steps.astype(np.float32), side="left").astype(np.uint8)
    lut.flags.writeable = False
    return lut


def _lut_index(v: np.ndarray) -> np.ndarray:
    # bitsandbytes' norm_to_lut_index: ((v + 1) * 0.5) * 65535 + 0.5, truncated; two roundings, no FMA.
    t = ((np.clip(v, np.float32(-1.0), np.float32(1.0)) + np.float32(1.0)) * np.float32(0.5)).astype(np.float32)
    return ((t * np.float32(65535)).astype(np.float32) + np.float32(0.5)).astype(np.float32).astype(np.int64)


def _quantize_absmax(absmax: np.ndarray, offset: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """8-bit blockwise dynamic quantisation of ``absmax - offset`` (bitsandbytes' CPU ``quantize_blockwise``).

    The value times the reciprocal of its block's absmax indexes ``dynamic_lut()``; an all-zero block
    gets code 0.
    """
    centred = (absmax - offset).astype(np.float32)
    n = centred.size
    blocks = -(-n // DOUBLE_QUANT_BLOCK)
    padded = np.zeros(blocks * DOUBLE_QUANT_BLOCK, dtype=np.float32)
    padded[:n] = centred
    scale = np.abs(padded).reshape(blocks, DOUBLE_QUANT_BLOCK).max(axis=1).astype(np.float32)
    live = scale > 0
    inv = np.where(live, np.float32(1.0) / np.where(live, scale, np.float32(1.0)), np.float32(0.0)).astype(np.float32)
    normed = (centred * np.repeat(inv, DOUBLE_QUANT_BLOCK)[:n]).astype(np.float32)
    codes = np.where(np.repeat(live, DOUBLE_QUANT_BLOCK)[:n], dynamic_lut()[_lut_index(normed)], 0)
    return codes.astype(np.uint8), scale


def _absmax_mean(absmax: np.ndarray) -> np.float32:
    # A pairwise tree sum in float32 (pad to a power of two with zeros, add halves), then divide by n:
    # every panel can replay this exactly. bitsandbytes uses torch's float32 mean, whose summation
    # order is torch's own, so its offset may differ from this one in the last bits.
    n = absmax.size
    width = 1 << max(0, (n - 1).bit_length())
    acc = np.zeros(width, dtype=np.float32)
    acc[:n] = absmax
    while acc.size > 1:
        half = acc.size // 2
        acc = (acc[:half] + acc[half:]).astype(np.float32)
    return np.float32(acc[0] / np.float32(n))


def nf4_quantize(w: np.ndarray, block_size: int = 64, double_quant: bool = False) -> NF4Weight:
    """Quantise ``w`` to NF4 exactly as bitsandbytes' ``quantize_4bit(quant_type="nf4")`` does.

    Codes and absmax equal bitsandbytes' bit for bit; with ``double_quant`` the absmax is quantised
    as bitsandbytes does it except that the mean subtracted first is ``_absmax_mean`` (see there).
    """
    w = _check_nf4_input(w, block_size)
    flat = w.reshape(-1)
    n = flat.size
    blocks, full = -(-n // block_size), n // block_size
    padded = np.zeros(blocks * block_size, dtype=np.float32)
    padded[:n] = flat
    padded = padded.reshape(blocks, block_size)
    absmax = np.abs(padded).max(axis=1).astype(np.float32)
    scaled = np.empty_like(padded)
    # Full blocks multiply by the reciprocal, a trailing partial block divides (and stores its floored
    # absmax): bitsandbytes' two code paths, kept so the rounding is identical.
    inv = (np.float32(1.0) / np.maximum(absmax[:full], _ABSMAX_FLOOR)).astype(np.float32)
    scaled[:full] = padded[:full] * inv[:, None]
    if full < blocks:
        absmax[full] = np.maximum(absmax[full], _ABSMAX_FLOOR)
        scaled[full] = padded[full] / absmax[full]
    scaled = np.clip(scaled.reshape(-1)[:n], np.float32(-1.0), np.float32(1.0))
    idx = np.full(n + n % 2, _NF4_ZERO, dtype=np.uint8)
    idx[:n] = np.searchsorted(_NF4_BOUNDS, scaled, side="left")
    codes = ((idx[0::2] << 4) | idx[1::2]).astype(np.uint8)
    if not double_quant:
        return NF4Weight(codes, absmax, tuple(w.shape), block_size)
    offset = _absmax_mean(absmax)
    qabsmax, scale = _quantize_absmax(absmax, offset)
    return NF4Weight(codes, qabsmax, tuple(w.shape), block_size, True, scale, float(offset))


def nf4_absmax(q: NF4Weight) -> np.ndarray:
    """The float32 per-block scales of ``q`` (undoing double quantisation: ``code8[a] * scale + offset``)."""
    if not q.double_quant:
        return np.asarray(q.absmax, dtype=np.float32)
    per_value = np.repeat(q.absmax_scale, DOUBLE_QUANT_BLOCK)[: q.absmax.size]
    return ((dynamic_map()[q.absmax] * per_value).astype(np.float32) + np.float32(q.absmax_offset)).astype(np.float32)


def nf4_dequantize(q: NF4Weight) -> np.ndarray:
    """The float32 weight ``NF4_CODE[code] * absmax[block]`` of shape ``q.shape`` (bitsandbytes' rounding)."""
    n = int(np.prod(q.shape))
    idx = np.empty(q.codes.size * 2, dtype=np.uint8)
    idx[0::2] = q.codes >> 4
    idx[1::2] = q.codes & 0x0F
    blocks = q.num_blocks
    values = np.zeros(blocks * q.block_size, dtype=np.float32)
    values[:n] = NF4_CODE[idx[:n]]
    out = values.reshape(blocks, q.block_size) * nf4_absmax(q)[:, None]
    return out.reshape(-1)[:n].astype(np.float32).reshape(q.shape)
