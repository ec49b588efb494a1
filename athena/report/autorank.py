"""The AutoRank part of a sweep's report: a table of the trials, a heatmap of the best pattern's ranks (layer x
module) and the best-so-far curve, beside a random-search baseline's when one is given.

Reads only the sweep's autorank_trials.jsonl (one JSON object per finished trial, written by
athena.adapters.autorank.AutoRank) and the baseline's.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from athena.eval.plots import plt  # pyplot with the Agg backend, chosen in one place
from athena.report.markdown import escape, link, table
from athena.report.runs import ReportError

TRIALS_FILE = "autorank_trials.jsonl"


def is_autorank_sweep(folder: Path) -> bool:
    return (Path(folder) / TRIALS_FILE).is_file()


def load_trials(path: Path) -> list[dict]:
    """The records of a trials file, or of <folder>/autorank_trials.jsonl."""
    path = Path(path)
    if path.is_dir():
        path = path / TRIALS_FILE
    if not path.is_file():
        raise ReportError(f"{path} not found: an AutoRank sweep folder holds {TRIALS_FILE}")
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise ReportError(f"{path} is not a trials file (JSON lines): {error}") from None
    if not records or any("ranks" not in r or "value" not in r for r in records):
        raise ReportError(f"{path} holds no AutoRank trials")
    return records


def best_so_far(records: list[dict]) -> list[float | None]:
    out, best = [], None
    for r in records:
        value = r["value"]
        if value is not None and math.isfinite(value):
            if best is None or (value < best if r["direction"] == "minimize" else value > best):
                best = value
        out.append(best)
    return out


def best_trial(records: list[dict]) -> dict | None:
    ok = [r for r in records if r["value"] is not None and math.isfinite(r["value"])]
    if not ok:
        return None
    sign = 1 if records[0]["direction"] == "minimize" else -1
    return min(ok, key=lambda r: (sign * r["value"], r["trial"]))


def write_autorank_report(folder: Path, out: Path, baseline: Path | None = None) -> list[Path]:
    """autorank.md, autorank_ranks.png and autorank_best_so_far.png under `out`; the files written, the .md last."""
    records = load_trials(folder)
    others = load_trials(baseline) if baseline is not None else None
    out.mkdir(parents=True, exist_ok=True)
    best = best_trial(records)
    written = []
    if best is not None:
        written.append(plot_rank_heatmap(best, out / "autorank_ranks.png"))
    written.append(plot_best_so_far(records, others, out / "autorank_best_so_far.png"))
    md = out / "autorank.md"
    md.write_text("\n".join(markdown(records, others, best, written, out)) + "\n")
    return [*written, md]


def markdown(records: list[dict], others: list[dict] | None, best: dict | None, figures: list[Path],
             out: Path) -> list[str]:
    first = records[0]
    direction = first["direction"]
    lines = ["# AutoRank", "",
             f"{len(records)} trials ({first['strategy']} search), {first['unit']} budget {first['budget']:,}, "
             f"score {'minimised' if direction == 'minimize' else 'maximised'}."]
    if best is not None:
        where = best.get("info", {}).get("run_dir")
        lines += ["", f"Best: trial {best['trial']}, score {best['value']:.6g}, total rank {best['total_rank']}, "
                      f"{best['trainable_params']:,} LoRA parameters" + (f" ({where})" if where else "") + "."]
    if others is not None:
        theirs = best_so_far(others)
        mine = best_so_far(records)
        n = min(len(mine), len(theirs))
        if n:
            lines += ["", f"After {n} trials: {first['strategy']} {_num(mine[n - 1])}, "
                          f"{others[0]['strategy']} {_num(theirs[n - 1])} (best so far)."]
    lines += ["", *[f"![{p.stem}]({link(p, out)})" for p in figures], ""]
    slots = list(first["ranks"])
    lines += [f"Ranks per slot, in this order: {', '.join(slots)}.", ""]
    curve = best_so_far(records)
    rows = [[str(r["trial"]), r["source"], _num(r["value"]), _num(b), str(r["total_rank"]),
             f"{r['trainable_params']:,}", escape(" ".join(str(r["ranks"][s]) for s in slots)),
             escape(str(r.get("info", {}).get("run_dir", "")))]
            for r, b in zip(records, curve)]
    lines += table(["trial", "source", "score", "best so far", "total rank", "LoRA params", "ranks", "run"], rows)
    return lines


def plot_rank_heatmap(best: dict, path: Path) -> Path:
    """Layers down, module kinds across: the best pattern's rank of each adapted module (0: no adapter)."""
    cells: dict[tuple[int, str], int] = {}
    for pattern, rank in best["rank_pattern"].items():
        module = re.sub(r"\\(.)", r"\1", pattern)
        parts = module.split(".")
        index = max((i for i, p in enumerate(parts) if p.isdigit()), default=None)
        layer = int(parts[index]) if index is not None else -1
        kind = ".".join(parts[index + 1:]) if index is not None else module
        cells[(layer, kind)] = rank
    layers = sorted({layer for layer, _ in cells})
    kinds = list(dict.fromkeys(kind for _, kind in cells))
    grid = [[cells.get((layer, kind), float("nan")) for kind in kinds] for layer in layers]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.2 + 0.28 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), [k.split(".")[-1] for k in kinds], rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(layer) if layer >= 0 else "-" for layer in layers])
    ax.set_ylabel("layer")
    if len(layers) * len(kinds) <= 160:  # numbers stay readable
        for y, row in enumerate(grid):
            for x, rank in enumerate(row):
                ax.text(x, y, str(rank), ha="center", va="center", color="white" if rank < 8 else "black",
                        fontsize=8)
    fig.colorbar(image, ax=ax, label="LoRA rank")
    ax.set_title(f"best pattern (trial {best['trial']}): ranks per layer x module", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_best_so_far(records: list[dict], others: list[dict] | None, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for series in ([records] + ([others] if others is not None else [])):
        curve = best_so_far(series)
        steps = [i + 1 for i, v in enumerate(curve) if v is not None]
        label = {"gp": "AutoRank (GP + EI)", "random": "random search"}.get(series[0]["strategy"],
                                                                            series[0]["strategy"])
        ax.step(steps, [v for v in curve if v is not None], where="post", marker="o", markersize=3, label=label)
    ax.set_xlabel("trials")
    ax.set_ylabel(f"best score so far ({'lower' if records[0]['direction'] == 'minimize' else 'higher'} is better)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.6g}"
