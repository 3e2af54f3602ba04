"""Test-time-compute sweeps: accuracy, mean depth and time as the recurrence depth varies.

Scores single-token answers: the prompt's last token is decoded at the depth under test (or
adaptively, with an exit criterion capped at the largest depth) and its argmax over
``answer_ids`` is compared with the reference. Earlier prompt tokens are context computed at
the same depth. Backend-neutral: it drives a backend's generation primitives (``ops``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diptych.core.recurrent_spec import initial_state_noise
from diptych.recurrent.exit import get_exit_criterion
from diptych.recurrent.generate import _iterate


def score(ops: Any, tokens: np.ndarray, mask: np.ndarray, answers: np.ndarray, answer_ids: Sequence[int], *,
          num_steps: int, exit_criterion: str | None = None, exit_threshold: float | None = None,
          init_scale: float = 1.0, state_seed: int = 0, batch_size: int = 256) -> dict[str, float]:
    """Accuracy of argmax over ``answer_ids`` at the last position, mean depth used, and seconds."""
    ids = np.asarray(answer_ids)
    correct, depths = [], []
    t0 = time.perf_counter()
    rng = np.random.default_rng(state_seed)
    for lo in range(0, len(tokens), batch_size):
        tok, msk = tokens[lo: lo + batch_size], mask[lo: lo + batch_size]
        ctx = ops.prelude(tok, msk)
        x = ops.init(ctx, initial_state_noise(ops.spec, (*tok.shape, ops.spec.n_embd), rng, init_scale))
        crit = None if exit_criterion is None else get_exit_criterion(exit_criterion, exit_threshold)
        (_, logits), used = _iterate(ops, ctx, x, num_steps, crit, np.zeros(len(tok), bool))
        pred = ids[np.argmax(logits[:, ids], -1)]
        correct.append(pred == answers[lo: lo + batch_size])
        depths.append(used)
    return {"accuracy": float(np.concatenate(correct).mean()), "mean_depth": float(np.concatenate(depths).mean()),
            "seconds": time.perf_counter() - t0}


def depth_sweep(ops: Any, tokens: np.ndarray, mask: np.ndarray, answers: np.ndarray, answer_ids: Sequence[int],
                steps: Sequence[int], criteria: Sequence[str] = ("kl",), **kw: Any) -> list[dict[str, Any]]:
    """One row per fixed depth, and per (criterion, cap) for adaptive exit."""
    rows = []
    for r in steps:
        rows.append({"mode": "fixed", "num_steps": int(r), **score(ops, tokens, mask, answers, answer_ids,
                                                                   num_steps=int(r), **kw)})
        for crit in criteria:
            res = score(ops, tokens, mask, answers, answer_ids, num_steps=int(r), exit_criterion=crit, **kw)
            rows.append({"mode": f"adaptive:{crit}", "num_steps": int(r), **res})
    return rows


def _plot(draw: Any, path: str | Path, xlabel: str, title: str, log_x: bool = False,
          figsize: tuple[float, float] = (5, 3.5)) -> Path | None:
    """One accuracy figure: ``draw(ax)`` adds the lines; None when matplotlib is missing."""
    try:  # lazy: matplotlib is optional, and only plotting needs it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=figsize)
    draw(ax)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(rows: list[dict[str, Any]], path: str | Path, title: str = "test-time scaling") -> Path | None:
    """Accuracy vs (mean) depth, one line per mode; returns None when matplotlib is missing."""
    def draw(ax: Any) -> None:
        for mode in dict.fromkeys(r["mode"] for r in rows):
            sel = [r for r in rows if r["mode"] == mode]
            x = [r["num_steps"] if mode == "fixed" else r["mean_depth"] for r in sel]
            ax.plot(x, [r["accuracy"] for r in sel], marker="o", label=mode)
        ax.legend()

    return _plot(draw, path, "recurrence depth (mean iterations for adaptive)", title, log_x=True)


def plot_by_length(by_length: dict[str, dict[str, float]], path: str | Path, train_max: int | None = None,
                   title: str = "accuracy by problem length") -> Path | None:
    """Accuracy vs problem length, one line per fixed depth: where extra iterations pay off.

    ``by_length`` maps depth -> {length: accuracy} (string keys, as JSON stores them);
    ``train_max`` draws a line at the longest training length. None when matplotlib is missing.
    """
    def draw(ax: Any) -> None:
        for depth, accs in by_length.items():
            lengths = sorted(accs, key=int)
            ax.plot([int(n) for n in lengths], [accs[n] for n in lengths], marker=".", label=f"r = {depth}")
        if train_max is not None:
            ax.axvline(train_max + 0.5, color="grey", linestyle=":", label="longest in training")
        ax.legend(fontsize=7, ncol=2)

    return _plot(draw, path, "problem length", title, figsize=(6, 3.5))
