"""Accumulation invariance: any split into micro-batches, summed, then divided once, is the full batch.

For every loss and aggregation mode, summing ``(unreduced_sum, denominator)`` over micro-batches and
dividing once must give exactly the full-batch loss, the full-batch gradient (sum of micro-batch
gradients of ``unreduced_sum`` divided by the total denominator) and the full-batch metrics.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diptych.core.losses import (
    AGGREGATIONS,
    PolicyLossConfig,
    PreferenceLossConfig,
    SFTLossConfig,
    ValueLossConfig,
    finalize_metrics,
    get_loss,
    sum_metrics,
)


def _mask(rng, B, T) -> np.ndarray:
    lengths = rng.integers(1, T + 1, size=B)
    return (np.arange(T)[None, :] >= (T - lengths)[:, None]).astype(np.float64)


def _policy(rng, B, T) -> dict:
    lp = -rng.random((B, T)) * 2 - 0.05
    return {"logprobs": lp, "old_logprobs": lp + rng.normal(size=(B, T)) * 0.3,
            "ref_logprobs": lp + rng.normal(size=(B, T)) * 0.3, "sampler_logprobs": lp + rng.normal(size=(B, T)) * 0.3,
            "advantages": rng.normal(size=B), "entropy": rng.random((B, T)), "mask": _mask(rng, B, T)}


def _value(rng, B, T) -> dict:
    v = rng.normal(size=(B, T))
    return {"values": v, "old_values": v + rng.normal(size=(B, T)) * 0.3, "returns": rng.normal(size=(B, T)),
            "mask": _mask(rng, B, T)}


def _preference(rng, B, T) -> dict:
    out = {}
    for side, t in (("chosen", T), ("rejected", T + 1)):
        lp = -rng.random((B, t)) * 2 - 0.05
        out.update({f"{side}_logprobs": lp, f"ref_{side}_logprobs": lp + rng.normal(size=(B, t)) * 0.4,
                    f"{side}_mask": _mask(rng, B, t)})
    return out


def _sft(rng, B, T) -> dict:
    return {"logprobs": -rng.random((B, T)) * 3, "mask": _mask(rng, B, T)}


CASES = [
    *[("policy", PolicyLossConfig(aggregation=a, norm_length=6), _policy, "logprobs") for a in AGGREGATIONS],
    ("policy", PolicyLossConfig(ratio_level="sequence", eps_low=0.05, eps_high=0.06, beta=0.04, dual_clip=3.0,
                                tis_cap=2.0, entropy_coef=0.01, aggregation="seq_mean_token_mean"),
     _policy, "logprobs"),
    *[("value", ValueLossConfig(clip=0.2, aggregation=a, norm_length=6), _value, "values") for a in AGGREGATIONS],
    *[("sft", SFTLossConfig(aggregation=a, norm_length=6), _sft, "logprobs") for a in AGGREGATIONS],
    *[("preference", PreferenceLossConfig(kind=k), _preference, "chosen_logprobs")
      for k in ("sigmoid", "ipo", "simpo", "orpo")],
]
IDS = [f"{n}-{getattr(c, 'aggregation', getattr(c, 'kind', ''))}-{i}" for i, (n, c, _, _) in enumerate(CASES)]


@st.composite
def batch_and_split(draw):
    B = draw(st.integers(1, 6))
    T = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    cuts = draw(st.sets(st.integers(1, B - 1), max_size=B - 1)) if B > 1 else set()
    bounds = [0, *sorted(cuts), B]
    return B, T, seed, list(itertools.pairwise(bounds))


def _rows(batch: dict, lo: int, hi: int) -> dict:
    return {k: v[lo:hi] for k, v in batch.items()}


@pytest.mark.parametrize(("name", "cfg", "make", "key"), CASES, ids=IDS)
@settings(max_examples=25, deadline=None)
@given(data=batch_and_split())
def test_micro_batches_summed_then_divided_once_equal_the_full_batch(name, cfg, make, key, data):
    B, T, seed, chunks = data
    batch = make(np.random.default_rng(seed), B, T)
    fn = get_loss(name)
    s_full, d_full, m_full = fn(batch, cfg)
    parts = [fn(_rows(batch, lo, hi), cfg) for lo, hi in chunks]
    s_acc = sum(float(s) for s, _, _ in parts)
    d_acc = sum(float(d) for _, d, _ in parts)
    assert d_acc == float(d_full)  # denominators are counts (times a constant): exact
    assert s_acc / d_acc == pytest.approx(float(s_full) / float(d_full), rel=1e-12, abs=1e-13)
    acc_metrics = finalize_metrics(sum_metrics(m for _, _, m in parts))
    full_metrics = finalize_metrics(m_full)
    assert acc_metrics.keys() == full_metrics.keys()
    for k, v in full_metrics.items():
        assert acc_metrics[k] == pytest.approx(v, rel=1e-10, abs=1e-12), k


@pytest.mark.parametrize(("name", "cfg", "make", "key"), CASES, ids=IDS)
@settings(max_examples=10, deadline=None)
@given(data=batch_and_split())
def test_accumulated_gradients_equal_the_full_batch_gradient(name, cfg, make, key, data):
    torch = pytest.importorskip("torch")
    B, T, seed, chunks = data
    batch = make(np.random.default_rng(seed), B, T)
    fn = get_loss(name)

    def tensors(b):
        out = {k: torch.tensor(v, dtype=torch.float64) for k, v in b.items()}
        out[key].requires_grad_(True)
        return out

    full = tensors(batch)
    s, d, _ = fn(full, cfg)
    (s / d).backward()
    # What a trainer does: backprop each micro-batch's unreduced sum, divide the summed gradient once.
    grads, total_den = [], 0.0
    for lo, hi in chunks:
        part = tensors(_rows(batch, lo, hi))
        s_k, d_k, _ = fn(part, cfg)
        s_k.backward()
        grads.append(part[key].grad.numpy())
        total_den += float(d_k)
    np.testing.assert_allclose(np.concatenate(grads) / total_den, full[key].grad.numpy(), rtol=1e-10, atol=1e-13)


def test_averaging_micro_batch_means_is_the_bug_this_contract_removes():
    """The classic gradient-accumulation bug: mean of per-micro-batch token means != global token mean."""
    batch = {"logprobs": np.array([[-1.0, -1.0, -1.0], [0.0, 0.0, -4.0]]), "mask": np.array([[1, 1, 1], [0, 0, 1]])}
    fn, cfg = get_loss("sft"), SFTLossConfig()
    parts = [fn(_rows(batch, i, i + 1), cfg) for i in range(2)]
    naive = np.mean([float(s) / float(d) for s, d, _ in parts])
    once = sum(float(s) for s, _, _ in parts) / sum(float(d) for _, d, _ in parts)
    assert naive == pytest.approx(2.5) and once == pytest.approx(7 / 4)
