"""Markdown pieces (tables, values a reader can take in at a glance) and the report of one run."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from athena.report.config_view import differences, key_config
from athena.report.figures import plot_run
from athena.report.runs import Run, default_metric, flatten, is_number

MAX_DIFF_ROWS = 60  # a run on another task differs in a whole data section; more rows than this is noise
LOG_TAIL_LINES = 12
PERCENT_WORDS = ("acc", "pass@", "exact", "mfu")  # rates in [0, 1] shown as percentages


def fmt(key: str, value: Any) -> str:
    """One value for a table cell: rates as percentages, counts with thousands separators, 4 significant digits."""
    if value is None:
        return "–"
    if isinstance(value, bool) or isinstance(value, str):
        return escape(str(value))
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        leaf = key.rsplit("/", 1)[-1].lower()
        if any(word in leaf for word in PERCENT_WORDS) and "stderr" not in leaf and 0.0 <= value <= 1.0:
            return f"{100 * value:.2f}%"
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) <= 16 and all(is_number(v) for v in value):
        return ", ".join(fmt(key, v) for v in value)
    if isinstance(value, list):
        return f"[{len(value)} values]"
    return escape(str(value))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def escape(text: str) -> str:
    """A table cell stays one cell: pipes escaped, newlines flattened."""
    return text.replace("|", "\\|").replace("\n", " ")


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def link(target: Path, start: Path) -> str:
    """A relative link from a file in `start` to `target`, safe for names with spaces, `=` and `,`."""
    return quote(os.path.relpath(target, start), safe="/=,+@-_.~")


def code_block(lines: list[str]) -> list[str]:
    return ["```", *[line.replace("```", "'''") for line in lines], "```"]


# ---------------------------------------------------------------------------------------------- one run

def training_summary(run: Run) -> list[tuple[str, str]]:
    """(what, value) rows: status, length, time, the end of training, throughput and memory."""
    rows = [("status", run.status), ("last step logged", fmt("step", run.last_step)),
            ("wall time", duration(run.wall_seconds) + " (first training step to last metric)")]
    loss = next((k for k in ("train/loss", "train/lm_loss") if k in run.scalar_keys),
                next((k for k in run.scalar_keys if k.startswith("train/") and "loss" in k), None))
    if loss:
        series = run.series(loss)
        rows.append((f"{loss} first → last", f"{fmt(loss, series.values[0])} → {fmt(loss, series.last)}"))
    for key, label in (("train/samples_per_s", "samples/s (median of log windows)"),
                       ("train/tokens_per_s", "tokens/s (median of log windows)"),
                       ("train/mfu", "MFU (median of log windows)")):
        value = run.median(key)
        if value is not None:
            rows.append((label, fmt(key, value)))
    for key in (k for k in run.scalar_keys if k.startswith("train/") and "mem" in k):
        rows.append((f"{key} (max)", fmt(key, run.maximum(key))))
    if run.resumed:
        rows.append(("resumed", "yes: a later attempt continued from a checkpoint (wall time includes the pause)"))
    if run.unreadable_lines:
        rows.append(("unreadable metrics lines", f"{run.unreadable_lines} (skipped; a run killed mid-line)"))
    return rows


def headline(run: Run) -> str:
    """One line: how the run ended, how long it took, its main eval number."""
    parts = [f"**{run.status}**", f"step {fmt('step', run.last_step)}", f"wall time {duration(run.wall_seconds)}"]
    final = {f"eval/{k}": v for k, v in flatten(run.final or {}).items() if is_number(v)}
    main = default_metric(list(final))
    if main:
        parts.append(f"{main} **{fmt(main, final[main])}**")
    return " · ".join(parts)


def eval_section(stem: str, content: dict[str, Any]) -> list[str]:
    flat = flatten(content)
    about = ", ".join(f"{k} {fmt(k, flat.pop(k))}" for k in ("step", "checkpoint", "data", "weights") if k in flat)
    title = "Final evaluation" if stem == "final" else f"Evaluation `{stem}`"
    lines = [f"### {title} (eval/{stem}.json{', ' + about if about else ''})", ""]
    return lines + table(["metric", "value"], [[escape(k), fmt(k, v)] for k, v in flat.items()]) + [""]


def write_run_report(run: Run, out: Path) -> list[Path]:
    """Plots and report.md for one run in `out`; the files written, report.md last."""
    out.mkdir(parents=True, exist_ok=True)
    figures = plot_run(run, out)
    lines = [f"# Run report: {run.name}", "", f"`{run.path.resolve()}`", "", headline(run), ""]

    lines += ["## Key config", ""]
    config_rows = key_config(run)
    if config_rows:
        lines += table(["part", "setting"], [[part, escape(value)] for part, value in config_rows]) + [""]
        changed = differences(run.config)
        if isinstance(changed, str):
            lines += [f"What differs from the defaults cannot be told: {changed}.", ""]
        elif changed:
            lines += ["<details><summary>What differs from the defaults of <code>python pretrain.py</code> "
                      f"({len(changed)} keys)</summary>", ""]
            shown = [[f"`{k}`", escape(a), escape(b)] for k, a, b in changed[:MAX_DIFF_ROWS]]
            lines += table(["key", "default", "this run"], shown)
            if len(changed) > MAX_DIFF_ROWS:
                lines += ["", f"… and {len(changed) - MAX_DIFF_ROWS} more keys: see config.json."]
            lines += ["", "</details>", ""]
        else:
            lines += ["Every key is at its default (`python pretrain.py` with no overrides).", ""]
    else:
        lines += ["No readable config.json.", ""]

    lines += ["## Evaluation", ""]
    if run.evals:
        for stem, content in run.evals.items():
            lines += eval_section(stem, content)
    else:
        lines += [f"No eval/final.json: the run {'is still running' if run.status == 'running' else 'did not finish'}.",
                  ""]

    lines += ["## Training", ""]
    lines += table(["", ""], [[what, value] for what, value in training_summary(run)]) + [""]
    if run.status == "failed":
        lines += [f"Last lines of pretrain.log ({run.path / 'pretrain.log'}):", ""]
        lines += code_block(run.log_tail(LOG_TAIL_LINES) or ["(no pretrain.log)"]) + [""]

    if figures:
        lines += ["## Plots", ""]
        for caption, path in figures:
            lines += [f"### {caption}", "", f"![{caption}]({link(path, out)})", ""]
    evaluator_plots = sorted((run.path / "eval").glob("*.png")) if (run.path / "eval").is_dir() else []
    if evaluator_plots:
        lines += ["## Plots the run wrote", ""]
        lines += [f"![{p.stem}]({link(p, out)})" for p in evaluator_plots] + [""]

    report = out / "report.md"
    report.write_text("\n".join(lines))
    return [path for _, path in figures] + [report]
