"""NF4 (QLoRA's 4-bit NormalFloat) base weights for the torch panel.

One text with ``backends/jax/nf4.py`` and the numpy oracle ``kernels/reference.nf4_quantize``: the
same codes, the same scales, the same float32 rounding, so a QLoRA model starts identical on both
panels. ``linear_nf4`` dequantises inside the matmul and keeps only the 4-bit codes for the
backward pass (the dequantised weight is rebuilt there), so a frozen 4-bit base costs 4 bits per
weight during training too. ``impl="bnb"`` runs bitsandbytes' ``matmul_4bit`` on the same codes
instead (its CUDA kernels are the fast path on GPU); the project's path is the default because it
is the one the JAX panel mirrors.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from math import prod

import numpy as np
import torch

from diptych.kernels.reference import (
    DOUBLE_QUANT_BLOCK,
    NF4_BLOCK_SIZES,
    NF4_CODE,
    NF4Weight,
    dynamic_lut,
    dynamic_map,
)

__all__ = ["IMPLS", "NF4Tensor", "dequantize", "from_reference", "linear_nf4", "nbytes", "quantize", "to_reference"]

IMPLS = ("native", "bnb")
_NF4_ZERO = 7  # the code of 0.0, which pads an odd element count
_ABSMAX_FLOOR = 1e-38  # bitsandbytes' clamp(min=1e-38)


@dataclasses.dataclass(frozen=True, eq=False)
class NF4Tensor:
    """Torch tensors of one NF4 weight, laid out as ``kernels.reference.NF4Weight`` describes.

    ``absmax_offset`` is a 0-d float32 tensor so the whole container moves with ``.to(device)``.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    block_size: int = 64
    double_quant: bool = False
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by field name (for registering them as buffers of a module)."""
        names = ("codes", "absmax", "absmax_scale", "absmax_offset")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def to(self, device: torch.device | str) -> NF4Tensor:
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.tensors().items()})


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    key = (name, torch.device(device))
    if key not in _TABLES:
        values = {"nf4": NF4_CODE, "dynamic": dynamic_map(), "lut": dynamic_lut()}[name]
        _TABLES[key] = torch.from_numpy(values.copy()).to(device)
    return _TABLES[key]


def _as_float_tensor(w: np.ndarray | torch.Tensor, block_size: int) -> torch.Tensor:
    if block_size not in NF4_BLOCK_SIZES:
        raise ValueError(f"NF4 block_size must be one of {NF4_BLOCK_SIZES} (as in bitsandbytes); got {block_size}.")
    t = w.detach() if isinstance(w, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(w)))
    if not t.is_floating_point():
        raise ValueError(f"NF4 quantises floating-point weights; got dtype {t.dtype}. Cast the weight to float32.")
    if t.numel() == 0:
        raise ValueError(f"NF4 cannot quantise an empty weight (shape {tuple(t.shape)}).")
    t = t.to(torch.float32)
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        raise ValueError(
            f"NF4 cannot quantise a weight with NaN or inf ({int((~finite).sum())} of {t.numel()} values); "
            "fix the checkpoint first."
        )
    return t


def _tree_mean(x: torch.Tensor) -> torch.Tensor:
    # The oracle's pairwise float32 sum (kernels.reference._absmax_mean), replayed op for op.
    n = x.numel()
    width = 1 << max(0, (n - 1).bit_length())
    acc = torch.zeros(width, dtype=torch.float32, device=x.device)
    acc[:n] = x
    while acc.numel() > 1:
        half = acc.numel() // 2
        acc = acc[:half] + acc[half:]
    return acc[0] / torch.tensor(float(n), dtype=torch.float32, device=x.device)


def _quantize_absmax(absmax: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The oracle's kernels.reference._quantize_absmax (bitsandbytes' CPU lookup-table quantiser), op for op.
    centred = absmax - offset
    n = centred.numel()
    blocks = -(-n // DOUBLE_QUANT_BLOCK)
    padded = torch.zeros(blocks * DOUBLE_QUANT_BLOCK, dtype=torch.float32, device=absmax.device)
    padded[:n] = centred
    scale = padded.abs().view(blocks, DOUBLE_QUANT_BLOCK).amax(dim=1)
    live = scale > 0
    inv = torch.where(live, 1.0 / torch.where(live, scale, torch.ones_like(scale)), 0.0)
    normed = centred * inv.repeat_interleave(DOUBLE_QUANT_BLOCK)[:n]
    t = (normed.clamp(-1.0, 1.0) + 1.0) * 0.5
    idx = (t * 65535.0 + 0.5).to(torch.int64)  # two roundings (eager torch never fuses them into an FMA)
    codes = torch.where(live.repeat_interleave(DOUBLE_QUANT_BLOCK)[:n], _table("lut", absmax.device)[idx], 0)
    return codes.to(torch.uint8), scale


def quantize(w: np.ndarray | torch.Tensor, block_size: int = 64, double_quant: bool = False) -> NF4Tensor:
    """NF4-quantise ``w`` on its own device; equals ``kernels.reference.nf4_quantize`` code for code."""
    t = _as_float_tensor(w, block_size)
    flat = t.reshape(-1)
    n = flat.numel()
    blocks, full = -(-n // block_size), n // block_size
    padded = torch.zeros(blocks * block_size, dtype=torch.float32, device=t.device)
    padded[:n] = flat
    padded = padded.view(blocks, block_size)
    absmax = padded.abs().amax(dim=1)
    # Full blocks multiply by the reciprocal, a trailing partial block divides: bitsandbytes' rounding.
    inv = 1.0 / absmax[:full].clamp(min=_ABSMAX_FLOOR)
    scaled = torch.empty_like(padded)
    scaled[:full] = padded[:full] * inv[:, None]
    if full < blocks:
        absmax[full] = absmax[full].clamp(min=_ABSMAX_FLOOR)
        scaled[full] = padded[full] / absmax[full]
    scaled = scaled.reshape(-1)[:n].clamp(-1.0, 1.0)
    bounds = _table("nf4", t.device)
    bounds = (bounds[:-1] + bounds[1:]) / 2
    idx = torch.full((n + n % 2,), _NF4_ZERO, dtype=torch.uint8, device=t.device)
    idx[:n] = torch.bucketize(scaled, bounds, right=False).to(torch.uint8)
    codes = (idx[0::2] << 4) | idx[1::2]
    shape = tuple(t.shape)
    if not double_quant:
        return NF4Tensor(codes, absmax, shape, block_size)
    offset = _tree_mean(absmax)
    qabsmax, scale = _quantize_absmax(absmax, offset)
    return NF4Tensor(codes, qabsmax, shape, block_size, True, scale, offset)


def block_absmax(q: NF4Tensor) -> torch.Tensor:
    """The float32 scale of every block (double quantisation undone: ``code8[a] * scale + offset``)."""
    if not q.double_quant:
        return q.absmax
    per_value = q.absmax_scale.repeat_interleave(DOUBLE_QUANT_BLOCK)[: q.absmax.numel()]
    return _table("dynamic", q.device)[q.absmax.to(torch.int32)] * per_value + q.absmax_offset


def dequantize(q: NF4Tensor) -> torch.Tensor:
    """The float32 weight of shape ``q.shape``; equals ``kernels.reference.nf4_dequantize`` exactly."""
    n = prod(q.shape)
    idx = torch.stack((q.codes >> 4, q.codes & 0x0F), dim=-1).reshape(-1)
    blocks = -(-n // q.block_size)
    if blocks * q.block_size == idx.numel():
        values = _table("nf4", q.device)[idx.to(torch.int32)]
    else:
        values = torch.zeros(blocks * q.block_size, dtype=torch.float32, device=q.device)
        values[:n] = _table("nf4", q.device)[idx[:n].to(torch.int32)]
    out = values.view(blocks, q.block_size) * block_absmax(q)[:, None]
    return out.reshape(-1)[:n].view(q.shape)


class _LinearNF4(torch.autograd.Function):
    """``x @ W.T + b`` with ``W`` rebuilt from 4-bit codes in the forward and again in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, q: NF4Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.q = q
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, dequantize(q).to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize(ctx.q).to(grad_out.dtype)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(dim=0)
        return grad_x, grad_bias, None


def _bnb_quant_state(q: NF4Tensor, dtype: torch.dtype):
    from bitsandbytes.functional import QuantState

    state2 = None
    if q.double_quant:
        state2 = QuantState(
            absmax=q.absmax_scale, code=_table("dynamic", q.device), blocksize=DOUBLE_QUANT_BLOCK, dtype=torch.float32
        )
    return QuantState(
        absmax=q.absmax,
        shape=torch.Size(q.shape),
        code=_table("nf4", q.device),
        blocksize=q.block_size,
        quant_type="nf4",
        dtype=dtype,
        offset=q.absmax_offset,
        state2=state2,
    )


def linear_nf4(
    x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None, *, impl: str = "native"
) -> torch.Tensor:
    """``x @ dequantize(q).T + bias`` for a 2-D ``q`` of shape [out, in], in ``x``'s dtype.

    ``impl="native"`` is the project's path (the JAX panel's twin); ``impl="bnb"`` is bitsandbytes'
    ``matmul_4bit`` on the same codes.
    """
    if impl not in IMPLS:
        raise ValueError(f"linear_nf4 impl must be one of {IMPLS}; got {impl!r}.")
    if len(q.shape) != 2 or x.shape[-1] != q.shape[1]:
        raise ValueError(f"linear_nf4 wants x [..., {q.shape[-1]}] and a 2-D weight [out, in]; got x {tuple(x.shape)} "
                         f"and weight {q.shape}.")
    if impl == "bnb":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("linear_nf4(impl='bnb') needs bitsandbytes (pip install bitsandbytes); or impl='native'.")
        if x.device.type == "cpu" and q.shape[0] > 1 and q.shape[1] % q.block_size and q.shape[1] % 2 == 0:
            # bitsandbytes 0.50's CPU dequantisation kernel reads such a weight with the wrong block scales
            # (its own quantiser and its Python reference disagree with it; tests/kernels/test_nf4.py).
            raise ValueError(
                f"linear_nf4(impl='bnb') on CPU needs in_features a multiple of block_size {q.block_size} "
                f"(got weight {q.shape}): bitsandbytes' CPU kernel mis-reads other shapes. Use impl='native'."
            )
        import bitsandbytes

        return bitsandbytes.matmul_4bit(x, q.codes.view(-1, 1).t(), quant_state=_bnb_quant_state(q, x.dtype), bias=bias)
    return _LinearNF4.apply(x, bias, q)


def nbytes(q: NF4Tensor) -> int:
    """Bytes the weight occupies: packed codes, block scales, and the double-quantisation scales."""
    return int(sum(t.numel() * t.element_size() for t in q.tensors().values()))


def from_reference(q: NF4Weight, device: torch.device | str = "cpu") -> NF4Tensor:
    """The oracle's ``NF4Weight`` as torch tensors on ``device`` (no requantisation)."""
    def t(a):
        return None if a is None else torch.from_numpy(np.array(a)).to(device)

    offset = torch.tensor(q.absmax_offset, dtype=torch.float32, device=device) if q.double_quant else None
    return NF4Tensor(t(q.codes), t(q.absmax), tuple(q.shape), q.block_size, q.double_quant, t(q.absmax_scale), offset)


def to_reference(q: NF4Tensor) -> NF4Weight:
    """The numpy ``NF4Weight`` holding the same codes and scales."""
    def a(t):
        return None if t is None else t.detach().cpu().numpy()

    offset = float(q.absmax_offset.item()) if q.double_quant else 0.0
    return NF4Weight(a(q.codes), a(q.absmax), tuple(q.shape), q.block_size, q.double_quant, a(q.absmax_scale), offset)
