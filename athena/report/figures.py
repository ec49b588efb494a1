"""The report's PNGs: a run's curves (one panel per metric, grouped by what they tell) and a sweep's comparisons."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from athena.eval.plots import plt  # pyplot with the Agg backend, chosen in one place
from athena.report.runs import Run, Series, is_count

MAX_MARKED_POINTS = 40  # fewer points than this get markers: a 4-step smoke run is still visible as points


def run_figure_groups(run: Run) -> list[tuple[str, str, list[str]]]:
    """(file stem, caption, metric keys) for each figure of a run that has at least one of its metrics. Every numeric
    train/* and eval/* key lands in exactly one figure (train/epoch and eval sizes apart); freeze/* and rehearsal/*
    keys have a figure each."""
    train = [k for k in run.scalar_keys if k.startswith("train/") and k != "train/epoch"]
    evals = [k for k in run.scalar_keys if k.startswith("eval/") and not is_count(k)]
    groups = [
        ("loss", "Training losses", [k for k in train if "loss" in k]),
        ("optimizer", "Learning rate and gradient norm", [k for k in ("train/lr", "train/grad_norm") if k in train]),
        ("throughput", "Throughput", [k for k in train if "per_s" in k or k.endswith("mfu")]),
        ("memory", "Memory", [k for k in train if "mem" in k]),
        ("eval", "Evaluation metrics over training", evals),
    ]
    placed = {k for _, _, keys in groups for k in keys}
    groups.append(("train_metrics", "Other training metrics", [k for k in train if k not in placed]))
    # Callbacks' own metric families (freezing=progressive: layers frozen over the run; rehearsal=buffer).
    for family, caption in (("freeze/", "Progressive freezing"), ("rehearsal/", "Rehearsal")):
        groups.append((family.rstrip("/"), caption, [k for k in run.scalar_keys if k.startswith(family)]))
    return [group for group in groups if group[2]]


def plot_run(run: Run, out: Path) -> list[tuple[str, Path]]:
    """Write each figure of run_figure_groups into `out`; (caption, path) in order."""
    written = []
    for stem, caption, keys in run_figure_groups(run):
        panels = [(key, run.series(key)) for key in keys]
        written.append((caption, plot_panels(panels, out / f"{stem}.png", title=f"{caption}: {run.name}")))
    return written


def plot_panels(panels: list[tuple[str, Series]], path: Path, title: str = "") -> Path:
    """One small axes per metric against the optimizer step, each on its own scale."""
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.2 * rows), squeeze=False)
    for ax, (key, series) in zip(axes.flat, panels):
        marker = "o" if len(series.steps) <= MAX_MARKED_POINTS else None
        ax.plot(series.steps, [_finite_or_nan(v) for v in series.values], marker=marker, markersize=3)
        ax.set(title=key, xlabel="optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return _save(fig, path, title)


def plot_overlay(curves: dict[str, Series], path: Path, metric: str) -> Path:
    """One line per job of a sweep, for one metric against the optimizer step."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, series in curves.items():
        marker = "o" if len(series.steps) <= MAX_MARKED_POINTS else None
        ax.plot(series.steps, [_finite_or_nan(v) for v in series.values], marker=marker, markersize=3, label=label)
    ax.set(xlabel="optimizer step", ylabel=metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return _save(fig, path, f"{metric} by job")


def plot_comparison(labels: list[str], values: list[float | None], path: Path, metric: str,
                    axis: str | None = None, x: list[float] | None = None) -> Path:
    """`metric` across jobs: a line over `axis` (one numeric varied override, values `x`) or one bar per job.
    Jobs without the metric (failed) are marked as such, not drawn as zero."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 4.5))
    if axis is not None and x is not None:
        points = sorted((xi, v) for xi, v in zip(x, values) if v is not None and math.isfinite(v))
        if points:
            ax.plot(*zip(*points), marker="o")
        positive = [xi for xi in x if xi > 0]
        if len(positive) == len(x) and max(positive) / min(positive) >= 10:
            ax.set_xscale("log")  # learning rates, sizes: spread over decades
        ax.set(xlabel=axis, ylabel=metric)
        for xi, v in zip(x, values):
            if v is None:
                ax.axvline(xi, color="tab:red", alpha=0.3, linestyle="--")
                ax.text(xi, 0.5, " failed", transform=ax.get_xaxis_transform(), rotation=90, color="tab:red")
    else:
        heights = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
        bars = ax.bar(range(len(labels)), heights, color="tab:blue")
        for bar, v in zip(bars, values):
            if v is None or not math.isfinite(v):
                bar.set_color("none")
                ax.annotate("failed" if v is None else str(v), (bar.get_x() + bar.get_width() / 2, 0),
                            ha="center", va="bottom", color="tab:red")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize="small")
        ax.set(ylabel=metric)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path, f"{metric} by job")


def _finite_or_nan(value: float) -> float:
    return value if math.isfinite(value) else float("nan")


def _save(fig, path: Path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
