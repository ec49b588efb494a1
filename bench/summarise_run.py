"""Summarise pretrain metrics.jsonl files as a markdown table: steady-state samples/s (median of
the logged windows after the first, which holds compilation), eval exact accuracy over steps."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def summarise(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    speed = [r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r][1:]
    memory = max((r.get("train/peak_mem_gb", 0.0) for r in rows), default=0.0)
    t0 = rows[0]["time"]
    lines = [f"### {path.stem}", "",
             f"steady-state samples/s (median of {len(speed)} windows of 50 steps, after the first): "
             f"{statistics.median(speed):,.0f}; peak GPU memory {memory:.1f} GB" if speed else "",
             "", "| step | minutes | train lm loss | eval exact accuracy | eval token accuracy | n |",
             "|---|---|---|---|---|---|"]
    last_loss = None
    for r in rows:
        last_loss = r.get("train/lm_loss", last_loss)
        if "eval/exact_accuracy" in r:
            lines.append(f"| {r['step']} | {(r['time'] - t0) / 60:.1f} | {last_loss:.3f} | "
                         f"{100 * r['eval/exact_accuracy']:.1f}% | {100 * r['eval/token_accuracy']:.1f}% | {r.get('eval/count')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(summarise(Path(p)) for p in sys.argv[1:] if Path(p).exists()))
