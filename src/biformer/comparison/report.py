"""The comparison's outputs: summary statistics, results.json, results.csv, table.md, cost.png, accuracy.png."""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._optional import require
from ..files import atomic_write
from .accuracy import TrainingResult
from .cost import CostPoint

__all__ = ["accuracy_summary", "cost_table", "accuracy_table", "plot_accuracy", "plot_cost", "write_outputs"]

TASK_TITLES = {"classification": "Fashion-MNIST top-1 (%)", "segmentation": "scenes mIoU"}


def accuracy_summary(results: Sequence[TrainingResult]) -> list[dict[str, Any]]:
    """One row per (task, attention type), in first-seen order: mean and sample standard deviation of the main
    metric over seeds, the seeds' values, mean wall seconds and the steps of a run."""
    groups: dict[tuple[str, str], list[TrainingResult]] = {}
    for result in results:
        groups.setdefault((result.task, result.attn_type), []).append(result)
    rows = []
    for (task, attn_type), runs in groups.items():
        values = [run.value for run in runs]
        rows.append(dict(
            task=task, attn_type=attn_type, metric=runs[0].metric, mean=statistics.fmean(values),
            std=statistics.stdev(values) if len(values) > 1 else 0.0, values=values, seeds=[run.seed for run in runs],
            seconds=statistics.fmean(run.seconds for run in runs), steps=runs[0].steps, params=runs[0].params,
        ))
    return rows


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def cost_table(points: Sequence[CostPoint], reference: str = "bra") -> str:
    """Markdown table of the cost, one row per (size, type); ratios against ``reference`` at the same size."""
    lines = [
        "| image | attention | params (M) | GFLOPs / image | vs " + reference + " | images/s | vs " + reference
        + " | peak extra memory (MiB) | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_size = {(point.size, point.attn_type): point for point in points}
    for point in points:
        base = by_size.get((point.size, reference))
        flops_ratio = speed_ratio = ""
        if base is not None and base.gflops and point.gflops is not None:
            flops_ratio = f"{point.gflops / base.gflops:.2f}x"
        if base is not None and base.images_per_s and point.images_per_s is not None:
            speed_ratio = f"{point.images_per_s / base.images_per_s:.2f}x"
        lines.append(
            f"| {point.size} px | {point.attn_type} | {point.params / 1e6:.2f} | {_number(point.gflops, 2)} | "
            f"{flops_ratio} | {_number(point.images_per_s, 2)} | {speed_ratio} | {_number(point.peak_extra_mib, 0)} | "
            f"{point.skipped or ''} |"
        )
    return "\n".join(lines)


def accuracy_table(summary: Sequence[dict[str, Any]]) -> str:
    """Markdown table: per task and type, mean ± std over seeds (n), the seeds' values, steps and time."""
    lines = ["| task | attention | params (M) | result: mean ± std (seeds) | per seed | steps | seconds / run |",
             "|---|---|---|---|---|---|---|"]
    for row in summary:
        digits = 2 if row["metric"] == "top1" else 4
        title = TASK_TITLES.get(row["task"], f"{row['task']} {row['metric']}")
        per_seed = ", ".join(f"{value:.{digits}f}" for value in row["values"])
        lines.append(
            f"| {title} | {row['attn_type']} | {row['params'] / 1e6:.2f} | {row['mean']:.{digits}f} ± "
            f"{row['std']:.{digits}f} ({len(row['values'])}) | {per_seed} | {row['steps']} | {row['seconds']:.0f} |"
        )
    return "\n".join(lines)


def _figure(columns: int, width: float = 4.2, height: float = 3.4) -> tuple[Any, Any]:
    figure_class = require("matplotlib.figure", extra="cli", purpose="drawing the comparison plots").Figure
    figure = figure_class(figsize=(columns * width, height), layout="constrained")
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def plot_cost(points: Sequence[CostPoint], path: str | os.PathLike, title: str) -> Path:
    """GFLOPs, images/s and peak extra memory against the image side, one line per attention type (log
    scale); skipped points are left out of their line."""
    figure, axes = _figure(3)
    panels = (("gflops", "GFLOPs per image"), ("images_per_s", "images/s"), ("peak_extra_mib", "peak extra MiB"))
    types = list(dict.fromkeys(point.attn_type for point in points))
    sizes = sorted({point.size for point in points})
    for ax, (key, label) in zip(axes, panels):
        for attn_type in types:
            line = [(p.size, getattr(p, key)) for p in points if p.attn_type == attn_type and getattr(p, key)]
            if line:
                ax.plot(*zip(*line), marker="o", label=attn_type, gid=f"{key}:{attn_type}")
        ax.set_xlabel("image side (px)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(size) for size in sizes], minor=False)
        ax.minorticks_off()
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(textwrap.fill(title, 60 * len(axes)), fontsize=8)
    return atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))


def plot_accuracy(summary: Sequence[dict[str, Any]], path: str | os.PathLike, title: str) -> Path:
    """One panel per task: mean ± std per attention type (a diamond with an error bar), each seed's value as a
    dot."""
    tasks = list(dict.fromkeys(row["task"] for row in summary))
    figure, axes = _figure(max(len(tasks), 1))
    for ax, task in zip(axes, tasks):
        rows = [row for row in summary if row["task"] == task]
        positions = range(len(rows))
        ax.errorbar(positions, [row["mean"] for row in rows], yerr=[row["std"] for row in rows], fmt="D",
                    capsize=5, color="#1f77b4", gid=f"mean:{task}")
        for position, row in zip(positions, rows):
            ax.plot([position + 0.15] * len(row["values"]), row["values"], "k.", markersize=5)
        ax.set_xticks(list(positions), [row["attn_type"] for row in rows], rotation=30, fontsize=8)
        ax.set_xlim(-0.5, len(rows) - 0.5)
        low = min(min(row["values"]) for row in rows)
        high = max(max(row["values"]) for row in rows)
        margin = max((high - low) * 0.5, abs(high) * 0.01, 1e-3)
        ax.set_ylim(low - margin, high + margin)
        ax.set_ylabel(TASK_TITLES.get(task, task))
        ax.grid(True, axis="y", alpha=0.3)
    figure.suptitle(textwrap.fill(title, 60 * len(axes)), fontsize=8)
    return atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))


def _csv_rows(points: Sequence[CostPoint], results: Sequence[TrainingResult]) -> list[dict[str, Any]]:
    """Long format: one row per measured number."""
    rows = []
    for point in points:
        for metric in ("params", "gflops", "images_per_s", "peak_extra_mib"):
            value = getattr(point, metric)
            if value is not None:
                rows.append(dict(section="cost", attn_type=point.attn_type, setting=f"{point.size} px", seed="",
                                 metric=metric, value=value))
    for result in results:
        for metric, value in {**result.metrics, "seconds": result.seconds, "steps": result.steps,
                              "params": result.params}.items():
            rows.append(dict(section=result.task, attn_type=result.attn_type, setting=f"{result.epochs} epochs",
                             seed=result.seed, metric=metric, value=value))
    return rows


def write_outputs(
    run_dir: str | os.PathLike,
    points: Sequence[CostPoint],
    results: Sequence[TrainingResult],
    header: dict[str, Any],
    cost_title: str = "",
    accuracy_title: str = "",
) -> str:
    """Write results.json, results.csv, table.md and the plots (each only with data) into ``run_dir``;
    returns the markdown text of table.md. ``header``: the command, machine and load, stored in results.json."""
    run_dir = Path(run_dir)
    summary = accuracy_summary(results)
    sections = []
    if points:
        sections.append(f"### Cost\n\n{cost_title}\n\n{cost_table(points)}")
        plot_cost(points, run_dir / "cost.png", cost_title)
    if results:
        sections.append(f"### Accuracy\n\n{accuracy_title}\n\n{accuracy_table(summary)}")
        plot_accuracy(summary, run_dir / "accuracy.png", accuracy_title)
    markdown = "\n\n".join(sections) + "\n"
    atomic_write(run_dir / "table.md", lambda temporary: temporary.write_text(markdown))
    document = dict(header, cost=[point.to_dict() for point in points],
                    training_runs=[result.to_dict() for result in results], accuracy_summary=summary)
    text = json.dumps(document, indent=2) + "\n"
    atomic_write(run_dir / "results.json", lambda temporary: temporary.write_text(text))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["section", "attn_type", "setting", "seed", "metric", "value"])
    writer.writeheader()
    writer.writerows(_csv_rows(points, results))
    atomic_write(run_dir / "results.csv", lambda temporary: temporary.write_text(buffer.getvalue()))
    return markdown
