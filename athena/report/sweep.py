"""A multirun: one row per job with what varies and how each job ended, sorted by a metric, and plots across jobs."""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from athena.report.figures import plot_comparison, plot_overlay
from athena.report.markdown import LOG_TAIL_LINES, code_block, duration, escape, fmt, link, table, write_run_report
from athena.report.runs import ReportError, Run, default_metric, flatten, is_count, is_number, lower_is_better

# Hydra names a job folder <num>_<override_dirname>: `key=value` items joined by commas, sorted by key. An item
# starts where a comma is followed by a key and `=`; a comma inside a value (`[1,2]`, `{a:1,b:2}`) is not followed
# by one.
JOB_NAME = re.compile(r"^(\d+)_(.*)$")
ITEM_START = re.compile(r",(?=[+~]*[A-Za-z_][\w.@/-]*=)")
MAX_CONFIG_COLUMNS = 6
# train/* columns and how a job's log windows become one number.
TRAIN_COLUMNS = (("train/samples_per_s", "median"), ("train/tokens_per_s", "median"), ("train/mfu", "median"),
                 ("train/peak_mem_gb", "maximum"))


def job_overrides(name: str) -> dict[str, str]:
    """`3_train.lr=0.001,arch.L_cycles=2` -> {"train.lr": "0.001", "arch.L_cycles": "2"}; {} for other names."""
    found = JOB_NAME.match(name)
    if not found or "=" not in found.group(2):
        return {}
    items = ITEM_START.split(found.group(2))
    return dict(item.split("=", 1) for item in items if "=" in item)


def varied_columns(runs: list[Run]) -> tuple[dict[str, dict[str, str]], dict[str, str], str]:
    """(column -> job -> value) for what varies across jobs, the overrides every job shares, and where they come
    from. Job folder names when Hydra wrote them; otherwise the config.json keys that differ, one column per distinct
    pattern of values (train.lr and the optimizer's lr, equal in every job, are one column)."""
    named = {run.name: job_overrides(run.name) for run in runs}
    keys = list(dict.fromkeys(k for overrides in named.values() for k in overrides))
    varied = [k for k in keys if len({named[job].get(k) for job in named}) > 1]
    if varied:
        common = {k: named[runs[0].name][k] for k in keys if k not in varied}
        return {k: {job: named[job].get(k, "–") for job in named} for k in varied}, common, "job folder names"
    flat = {run.name: {k: json.dumps(v) for k, v in flatten(run.config, sep=".").items()} for run in runs
            if run.config}
    keys = sorted({k for values in flat.values() for k in values}, key=_column_priority)
    columns: dict[str, dict[str, str]] = {}
    patterns = set()
    for key in keys:
        values = {job: flat.get(job, {}).get(key, "–") for job in (run.name for run in runs)}
        pattern = tuple(values[job] for job in values if job in flat)
        if len(set(pattern)) > 1 and pattern not in patterns:
            patterns.add(pattern)
            columns[key] = {job: _unquote(value) for job, value in values.items()}
    return columns, {}, "config.json"


def _column_priority(key: str) -> tuple:
    order = ("train.", "arch.", "adapter.", "data.", "optimizer.")
    return (next((i for i, prefix in enumerate(order) if key.startswith(prefix)), len(order)), key.count("."), key)


def _unquote(value: str) -> str:
    return value[1:-1] if value.startswith('"') and value.endswith('"') else value


def job_metrics(run: Run) -> dict[str, Any]:
    """The numbers a job's row shows: its final eval, the end of training, throughput, memory, size, time."""
    row: dict[str, Any] = {"status": run.status, "step": run.last_step}
    for key, value in flatten(run.final or {}).items():
        if key != "step" and is_number(value) and not is_count(key):
            row[f"eval/{key}"] = value
    loss = "train/loss" if "train/loss" in run.scalar_keys else next(
        (k for k in run.scalar_keys if k.startswith("train/") and "loss" in k), None)
    if loss:
        row[loss] = run.last(loss)
    for key, how in TRAIN_COLUMNS:
        value = getattr(run, how)(key)
        if value is not None:
            row[key] = value
    params = run.trainable_params
    if params:
        row["trainable_params"] = params[0]
    row["wall_time"] = run.wall_seconds
    return row


def pick(name: str | None, columns: list[str], what: str) -> str:
    if name in columns:
        return name
    near = difflib.get_close_matches(name or "", columns, n=4, cutoff=0.3) or columns[:6]
    raise ReportError(f"no column {name!r} to {what}; closest: {', '.join(near)} (every column: "
                      f"{', '.join(columns)})")


def sort_jobs(values: dict[str, Any], descending: bool) -> list[str]:
    """Job names by their value (numbers, or text for a varied override that is not a number), best first; jobs
    without one keep their order at the end."""
    numbers = {job: _number(v) if isinstance(v, str) else v for job, v in values.items()}
    if all(is_number(v) for v in numbers.values() if v is not None) and any(is_number(v) for v in numbers.values()):
        ranked = {job: v for job, v in numbers.items() if is_number(v) and math.isfinite(v)}  # NaN compares false
    else:
        ranked = {job: str(v) for job, v in values.items() if v not in (None, "–")}
    order = sorted(ranked, key=lambda job: ranked[job], reverse=descending)
    return order + [job for job in values if job not in ranked]


def write_sweep_report(folder: Path, runs: list[Run], out: Path, sort: str | None = None, order: str | None = None,
                       metric: str | None = None) -> list[Path]:
    """Each job's report in out/<job>/, then out/report.md with the comparison; the files written, report.md last."""
    varied, common, source = varied_columns(runs)
    rows = {run.name: job_metrics(run) for run in runs}
    metric_columns = list(dict.fromkeys(k for row in rows.values() for k in row))
    cells = {job: {**{k: varied[k][job] for k in varied}, **rows[job]} for job in rows}
    sort_key = pick(sort, list(varied) + metric_columns, "sort by") if sort else None
    if metric:
        metric = pick(metric, metric_columns, "plot")
    else:
        metric = sort_key if sort_key in metric_columns else (default_metric(metric_columns) or "step")
    descending = {"asc": False, "desc": True}.get(order or "", not lower_is_better(sort_key or ""))
    jobs = sort_jobs({job: cells[job].get(sort_key) for job in cells}, descending) if sort_key else list(rows)
    by_name = {run.name: run for run in runs}

    written: list[Path] = []
    job_reports = {}
    for run in runs:
        job_written = write_run_report(run, out / run.name)
        job_reports[run.name] = job_written[-1]
        written += job_written

    def label(job: str) -> str:
        return ", ".join(f"{k}={varied[k][job]}" for k in varied) or job

    values = [rows[job].get(metric) if is_number(rows[job].get(metric)) else None for job in jobs]
    axis = next(iter(varied)) if len(varied) == 1 else None
    x = [_number(varied[axis][job]) for job in jobs] if axis else None
    if x is not None and any(v is None for v in x):
        axis, x = None, None  # not numbers: bars
    comparison = plot_comparison([label(job) for job in jobs], values, out / f"compare_{_slug(metric)}.png", metric,
                                 axis=axis, x=x)
    written.append(comparison)
    loss = next((c for c in metric_columns if c.startswith("train/") and "loss" in c), None)
    curves = {label(job): by_name[job].series(loss) for job in jobs if loss and by_name[job].series(loss)}
    overlay = plot_overlay(curves, out / f"{_slug(loss)}_by_job.png", loss) if curves else None
    if overlay:
        written.append(overlay)

    lines = _sweep_header(folder, runs, common, source)
    ordering = (f"sorted by {sort_key}, {'highest' if descending else 'lowest'} first" if sort_key
                else "in job order (`--sort COLUMN` orders them)")
    lines += [f"## Jobs ({ordering})", ""]
    body = []
    for job in jobs:
        name = JOB_NAME.match(job).group(1) if job_overrides(job) else job
        row = [f"[{escape(name)}]({link(job_reports[job], out)})"] + [escape(varied[k][job]) for k in varied]
        row += [duration(rows[job].get(c)) if c == "wall_time" else fmt(c, rows[job].get(c)) for c in metric_columns]
        body.append(row)
    lines += table(["job"] + list(varied) + metric_columns, body) + [""]
    lines += ["eval/* columns come from each job's eval/final.json; train/*loss* is the last logged value; samples/s, "
              "tokens/s and MFU the median over log windows; peak memory the maximum; wall_time from the first "
              "training step to the last metric.", ""]
    lines += [f"## {metric} across jobs", "", f"![{metric} across jobs]({link(comparison, out)})", ""]
    if overlay:
        lines += [f"## {loss} by job", "", f"![{loss} by job]({link(overlay, out)})", ""]
    failed = [run for run in runs if run.status == "failed"]
    if failed:
        lines += ["## Failed jobs", ""]
        for run in failed:
            lines += [f"### {escape(run.name)}", "", f"No eval/final.json; last step logged: "
                      f"{fmt('step', run.last_step)}. Last lines of {run.path / 'pretrain.log'}:", ""]
            lines += code_block(run.log_tail(LOG_TAIL_LINES) or ["(no pretrain.log)"]) + [""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return written + [report]


def _slug(metric: str) -> str:
    return re.sub(r"[^\w.-]+", "_", metric)


def _sweep_header(folder: Path, runs: list[Run], common: dict[str, str], source: str) -> list[str]:
    counts = {status: sum(run.status == status for run in runs) for status in ("finished", "running", "failed")}
    state = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    lines = [f"# Sweep report: {folder.name}", "", f"`{folder.resolve()}`: {len(runs)} jobs ({state}); the columns "
             f"before the metrics are what varies across jobs (read from {source}).", ""]
    command = _sweep_command(folder / "multirun.yaml")
    if command:
        lines += [f"Command: `{command}`", ""]
    if common:
        lines += ["Shared by every job: " + ", ".join(f"`{k}={v}`" for k, v in common.items()), ""]
    return lines


def _sweep_command(path: Path) -> str | None:
    """The command line Hydra recorded in multirun.yaml (without the hydra.* overrides)."""
    try:
        hydra = yaml.safe_load(path.read_text())["hydra"]
        job = hydra["job"]
        overrides = hydra["overrides"]["task"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    config = f" --config-name {job['config_name']}" if job.get("config_name") not in (None, "config") else ""
    return f"python {job.get('name', 'pretrain')}.py -m{config} " + " ".join(overrides)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
