"""Triton kernels in the interpreter (TRITON_INTERPRET=1, set by conftest) against the numpy oracle.

Shapes (37 tokens, hidden 48, vocab 300) divide none of the block sizes (16 / 64 / 16).
"""

from __future__ import annotations

import numpy as np
import pytest

from diptych.kernels import reference as ref
from tests.conftest import needs_triton
from tests.kernels.test_chunked import _bf16_round, _case, assert_matches_oracle, run_torch

pytestmark = needs_triton


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fused_logprobs_forward_and_backward_match_numpy(dtype, temperature):
    h, w, y, g_lp, g_ent = _case()
    got = run_torch("fused", h, w, y, temperature, g_lp, g_ent, dtype)
    if dtype == "bfloat16":
        h, w = _bf16_round(h), _bf16_round(w)
    assert_matches_oracle(got, h, w, y, temperature, g_lp, g_ent, dtype)


def test_fused_logprobs_with_other_blocks_and_only_logp_used():
    import torch

    from diptych.kernels.triton.logprobs import fused_selective_logprobs

    h, w, y, g_lp, _ = _case(4)
    ht, wt = torch.tensor(h[:21]).requires_grad_(), torch.tensor(w[:130]).requires_grad_()
    yy = y[:21] % 130
    lp, _ = fused_selective_logprobs(ht, wt, torch.tensor(yy), 1.3, blocks=(32, 128, 32))
    (lp * torch.tensor(g_lp[:21])).sum().backward()
    want_dh, want_dw = ref.selective_logprobs_backward(h[:21], w[:130], yy, 1.3, g_lp[:21], None)
    np.testing.assert_allclose(lp.detach().numpy(), ref.selective_logprobs(h[:21], w[:130], yy, 1.3)[0], atol=1e-5)
    np.testing.assert_allclose(ht.grad.numpy(), want_dh, atol=1e-5)
    np.testing.assert_allclose(wt.grad.numpy(), want_dw, atol=1e-5)


def test_bad_block_sizes_are_refused():
    import torch

    from diptych.kernels.triton.logprobs import fused_selective_logprobs

    h, w, y, _, _ = _case()
    with pytest.raises(ValueError, match="powers of two >= 16"):
        fused_selective_logprobs(torch.tensor(h), torch.tensor(w), torch.tensor(y), blocks=(8, 64, 16))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_rms_norm_forward_and_backward_match_numpy(dtype):
    import torch

    from diptych.backends.torch.kernels import rms_norm

    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 7, 40)).astype(np.float32)
    wgt = (1 + 0.1 * rng.normal(size=40)).astype(np.float32)
    go = rng.normal(size=x.shape).astype(np.float32)
    dt = getattr(torch, dtype)
    xt, wt = torch.tensor(x).to(dt).requires_grad_(), torch.tensor(wgt).to(dt).requires_grad_()
    out = rms_norm(xt, wt, 1e-5, kernels="fused")
    assert out.dtype == dt
    (out.float() * torch.tensor(go)).sum().backward()
    if dtype == "bfloat16":
        x, wgt = _bf16_round(x), _bf16_round(wgt)
        # Hugging Face's rounding points, reproduced exactly by the kernel.
        plain = rms_norm(xt.detach(), wt.detach(), 1e-5, kernels="reference")
        assert torch.equal(out.detach(), plain)
    tol = 1e-5 if dtype == "float32" else 1e-2
    want_dx, want_dw = ref.rms_norm_backward(x, wgt, 1e-5, go)
    for got, want in ((out, ref.rms_norm(x, wgt, 1e-5)), (xt.grad, want_dx), (wt.grad, want_dw)):
        got = got.detach().float().numpy()
        assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max())
