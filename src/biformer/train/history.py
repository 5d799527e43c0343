"""The metric history of a run: ``metrics.csv`` (one row per epoch), ``metrics.json`` and ``metrics.png``."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._optional import require
from ..files import atomic_write

__all__ = ["plot_history", "write_history"]


def _scalar_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)) and key not in columns:
                columns.append(key)
    return columns


def write_history(run_dir: str | os.PathLike, rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Write ``metrics.csv`` (scalar values of each row) and ``metrics.json`` (rows and ``summary``)."""
    run_dir = Path(run_dir)
    columns = _scalar_columns(rows)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(run_dir / "metrics.csv", lambda path: path.write_text(text.getvalue()))
    document = json.dumps(dict(history=list(rows), **summary), indent=1)
    atomic_write(run_dir / "metrics.json", lambda path: path.write_text(document))


def plot_history(path: str | os.PathLike, rows: Sequence[dict[str, Any]], metric_names: Sequence[str]) -> None:
    """Two panels against the epoch: losses (training and evaluation), and ``metric_names`` (e.g. top-1)."""
    require("matplotlib", extra="cli", purpose="writing metrics.png").use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [row["epoch"] for row in rows]
    losses = (("train_loss", "training loss"), ("loss", "evaluation loss"), ("ema_loss", "EMA evaluation loss"))
    for key, label in losses:
        points = [(epoch, row[key]) for epoch, row in zip(epochs, rows) if key in row]
        if points:
            loss_axis.plot(*zip(*points), marker="o", label=label)
    for name in metric_names:
        for key in (name, f"ema_{name}"):
            points = [(epoch, row[key]) for epoch, row in zip(epochs, rows) if key in row]
            if points:
                metric_axis.plot(*zip(*points), marker="o", label=key.replace("top1", "top-1 accuracy (%)"))
    loss_axis.set(xlabel="epoch", ylabel="loss", title="loss")
    metric_axis.set(xlabel="epoch", ylabel="%", title="evaluation")
    for axis in (loss_axis, metric_axis):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))
    plt.close(figure)
