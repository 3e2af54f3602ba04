"""Curve data (moving averages, evaluation markers) checked against numpy; the PNG path still works."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diptych.core.metrics import plot_curves
from diptych.core.plotting import Marker, curve_series, default_window, moving_average


def trailing_mean(x: list[float], w: int) -> list[float]:
    return [float(np.mean(x[max(0, i - w + 1):i + 1])) for i in range(len(x))]


@pytest.mark.parametrize("w", [1, 3, 10, 50])
def test_moving_average_is_the_trailing_mean(w: int) -> None:
    x = list(np.random.default_rng(0).normal(size=37))
    np.testing.assert_allclose(moving_average(x, w), trailing_mean(x, w), rtol=1e-12, atol=1e-12)


def test_moving_average_rejects_a_zero_window() -> None:
    with pytest.raises(ValueError, match="window must be >= 1"):
        moving_average([1.0], 0)


def test_default_window_is_a_tenth_clamped() -> None:
    assert [default_window(n) for n in (0, 5, 150, 499, 5000)] == [1, 1, 15, 49, 50]


def test_curve_series_smooths_each_key_skips_gaps_and_carries_markers() -> None:
    rng = np.random.default_rng(1)
    history = [{"step": float(s), "reward": float(rng.random()), "completion_length": 3.0 + s % 2}
               for s in range(1, 41)]
    history[5]["reward"] = math.nan                  # a non-finite step is dropped, not plotted as a spike
    del history[7]["completion_length"]
    marks = {"reward": [Marker(0.0, 0.25, "after SFT"), Marker(40.0, 0.5, "after GRPO")]}
    panels = curve_series(history, ("reward", "completion_length", "kl"), labels={"reward": "reward (sums right)"},
                          markers=marks)
    assert [p.key for p in panels] == ["reward", "completion_length"]      # kl absent: no empty panel
    reward, length = panels
    assert reward.ylabel == "reward (sums right)" and length.ylabel == "completion length (tokens)"
    assert reward.steps == [h["step"] for i, h in enumerate(history) if i != 5]
    assert reward.window == 3 and len(reward.raw) == 39
    np.testing.assert_allclose(reward.smooth, trailing_mean(reward.raw, 3))
    assert len(length.raw) == 39 and 8.0 not in length.steps
    assert [(m.x, m.y, m.label) for m in reward.markers] == [(0.0, 0.25, "after SFT"), (40.0, 0.5, "after GRPO")]
    assert length.markers == []
    # A fixed window applies to every panel; markers alone still make a panel.
    only = curve_series([], ("reward",), window=5, markers=marks)
    assert len(only) == 1 and only[0].raw == [] and len(only[0].markers) == 2


def test_plot_curves_keeps_its_signature_and_writes_a_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    history = [{"step": float(s), "loss": 1.0 / s} for s in range(1, 11)]
    out = plot_curves(history, tmp_path / "c.png", keys=("loss",), title="t")
    assert out == tmp_path / "c.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves(history, tmp_path / "none.png", keys=("reward",)) is None
    marked = plot_curves(history, tmp_path / "m.png", keys=("loss",), markers={"loss": [Marker(10.0, 0.1, "eval")]})
    assert marked is not None and marked.stat().st_size > 0
