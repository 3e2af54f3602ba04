"""Metric sinks for training loops: JSONL on disk, a live console bar, TensorBoard, a PNG plot.

Loops call ``log(step, metrics)`` once per step on a :class:`MetricsLogger`; every sink
receives the same flat ``{name: float}`` dict. Names follow the papers (``reward``,
``kl``, ``clipfrac``, ``entropy``, ``completion_length``) so curves compare across tools.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol


class Sink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def _clean(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


class JsonlSink:
    """One JSON object per step, flushed each time so a killed run keeps every finished step."""

    def __init__(self, path: str | Path, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a" if append else "w")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: (None if not math.isfinite(v) else v) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


CONSOLE_KEYS: tuple[str, ...] = ("reward", "loss", "async/generator_tokens_per_s", "async/trainer_tokens_per_s")
"""What the progress bar shows, where a step has it (an asynchronous run adds both roles' throughput)."""


class ConsoleSink:
    """A rich progress bar whose description carries the live reward (or loss)."""

    def __init__(self, total: int, description: str = "train", keys: Iterable[str] = CONSOLE_KEYS) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.keys = tuple(keys)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[status]}"), transient=False)
        self.task = self.progress.add_task(description, total=total, status="")
        self.progress.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        status = "  ".join(f"{k} {metrics[k]:.3f}" for k in self.keys if k in metrics)
        self.progress.update(self.task, completed=step, status=status)

    def close(self) -> None:
        self.progress.stop()


class TensorBoardSink:
    """Written only when tensorboardX is installed (the core may not import torch's writer)."""

    def __init__(self, logdir: str | Path) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(logdir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class MetricsLogger:
    """Fan-out to sinks; keeps the history in memory for the end-of-run plot."""

    def __init__(self, sinks: list[Sink] | None = None) -> None:
        self.sinks = list(sinks or [])
        self.history: list[dict[str, float]] = []
        self._t0 = time.perf_counter()

    @classmethod
    def for_run(cls, out_dir: str | Path | None, total_steps: int, description: str = "train",
                console: bool = True, tensorboard: bool = True, append: bool = False) -> MetricsLogger:
        sinks: list[Sink] = []
        if out_dir is not None:
            sinks.append(JsonlSink(Path(out_dir) / "metrics.jsonl", append=append))
            if tensorboard:
                with contextlib.suppress(ImportError):
                    sinks.append(TensorBoardSink(Path(out_dir) / "tb"))
        if console:
            sinks.append(ConsoleSink(total_steps, description))
        return cls(sinks)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        clean = _clean(metrics)
        clean.setdefault("elapsed_s", time.perf_counter() - self._t0)
        self.history.append({"step": float(step), **clean})
        for s in self.sinks:
            s.log(step, clean)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def plot_curves(history: list[dict[str, float]], path: str | Path,
                keys: tuple[str, ...] = ("reward", "completion_length"), title: str = "",
                window: int | None = None, labels: dict[str, str] | None = None,
                markers: dict[str, Any] | None = None, xlabel: str = "optimizer step") -> Path | None:
    """One panel per metric, raw per-step series faint under a bold moving average; None without matplotlib.

    ``markers`` maps a key to :class:`diptych.core.plotting.Marker` evaluations drawn on its panel;
    the data work lives in :func:`diptych.core.plotting.curve_series` so it can be tested.
    """
    from diptych.core.plotting import curve_series, plot_series

    panels = curve_series(history, keys, window=window, labels=labels, markers=markers)
    return plot_series(panels, path, title=title, xlabel=xlabel)
