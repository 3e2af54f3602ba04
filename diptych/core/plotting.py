"""Training curves a person can read: the raw series faint, a moving average bold, evaluations marked.

A per-step GRPO reward is a mean over a handful of prompts, so its raw curve is mostly noise;
the trend is what the reader wants, and the raw series stays visible underneath so nothing is
hidden. Held-out accuracies (measured greedily, in the same [0, 1] units as a verifier reward)
are drawn as labelled points on the reward panel. :func:`curve_series` does all the data work
and returns plain lists, so tests check the numbers without reading pixels; :func:`plot_series`
only draws them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_LABELS: dict[str, str] = {
    "reward": "reward (mean verifier score)",
    "completion_length": "completion length (tokens)",
    "loss": "loss",
    "rewards_accuracy": "preference accuracy (chosen > rejected)",
    "kl": "KL to reference",
    "entropy": "entropy (nats per token)",
}


@dataclass(frozen=True)
class Marker:
    """One evaluation drawn on a panel: ``y`` at step ``x`` with a short ``label`` (e.g. "after SFT")."""

    x: float
    y: float
    label: str


@dataclass
class Panel:
    """One metric ready to draw: the raw points, their trailing moving average and any markers."""

    key: str
    ylabel: str
    steps: list[float]
    raw: list[float]
    smooth: list[float]
    window: int
    markers: list[Marker] = field(default_factory=list)


def default_window(n: int) -> int:
    """About a tenth of the run, between 1 and 50 steps: long enough to average noise, short enough to show change."""
    return max(1, min(50, n // 10))


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start, so the curve starts at step one)."""
    if window < 1:
        raise ValueError(f"moving-average window must be >= 1, got {window}.")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def curve_series(history: Sequence[Mapping[str, float]], keys: Sequence[str] = ("reward", "completion_length"),
                 window: int | None = None, labels: Mapping[str, str] | None = None,
                 markers: Mapping[str, Sequence[Marker]] | None = None) -> list[Panel]:
    """One :class:`Panel` per key present in ``history`` (rows with ``step``); non-finite values are skipped.

    ``window`` None picks :func:`default_window` of each series' length; ``markers`` maps a key to the
    evaluations drawn on its panel (a key with markers but no series still gets a panel).
    """
    names = {**DEFAULT_LABELS, **(labels or {})}
    marks = markers or {}
    panels = []
    for key in keys:
        pts = [(float(h["step"]), float(h[key])) for h in history
               if key in h and h[key] is not None and math.isfinite(float(h[key]))]
        if not pts and not marks.get(key):
            continue
        steps = [s for s, _ in pts]
        raw = [v for _, v in pts]
        w = window if window is not None else default_window(len(raw))
        panels.append(Panel(key=key, ylabel=names.get(key, key), steps=steps, raw=raw,
                            smooth=moving_average(raw, w), window=w, markers=list(marks.get(key, ()))))
    return panels


def plot_series(panels: Sequence[Panel], path: str | Path, title: str = "", xlabel: str = "optimizer step"
                ) -> Path | None:
    """Draw ``panels`` side by side into a PNG; returns None when matplotlib is missing or there is nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, p in zip(axes[0], panels):
        if p.steps:
            ax.plot(p.steps, p.raw, lw=0.8, alpha=0.3, color="C0", label="per step")
            ax.plot(p.steps, p.smooth, lw=2.2, color="C0", label=f"moving average ({p.window} steps)")
        for i, m in enumerate(p.markers):
            ax.scatter([m.x], [m.y], s=55, zorder=5, color=f"C{i + 1}", edgecolor="black",
                       label=f"{m.label}: {m.y:.1%}" if 0.0 <= m.y <= 1.0 else f"{m.label}: {m.y:.3g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(p.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
