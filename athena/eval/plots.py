"""PNG plots a person would rather look at than read: accuracy per ACT step, where the Q head halts,
and the training curve."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402


def plot_accuracy_by_step(exact_by_step: list[float], halt_counts: list[int], path: Path, title: str = "") -> Path:
    steps = list(range(1, len(exact_by_step) + 1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(steps, [100 * a for a in exact_by_step], marker="o")
    left.set(xlabel="supervision (ACT) step", ylabel="exact accuracy (%)", title="accuracy after each step")
    left.grid(alpha=0.3)
    right.bar(steps, halt_counts)
    right.set(xlabel="step where the Q head first halts", ylabel="sequences", title="halting histogram")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training_curve(metrics_jsonl: Path, path: Path) -> Path | None:
    """Train loss and eval exact accuracy against step, from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["train/lm_loss"]) for r in rows if "train/lm_loss" in r]
    evals = [(r["step"], 100 * r["eval/exact_accuracy"]) for r in rows if "eval/exact_accuracy" in r]
    if not train:
        return None
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(*zip(*train), color="tab:blue", label="train lm loss")
    left.set(xlabel="optimizer step", ylabel="train lm loss", yscale="log")
    if evals:
        right = left.twinx()
        right.plot(*zip(*evals), color="tab:red", marker="o", label="eval exact accuracy")
        right.set_ylabel("eval exact accuracy (%)")
        right.set_ylim(0, 100)
    fig.legend(loc="upper center", ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
