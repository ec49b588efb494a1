"""Reading what a run left on disk: config.json, metrics.jsonl, eval/*.json, pretrain.log and the run-folder lock.

Only reads; a run still writing, a run killed mid-line or a job that failed before its first metric each read as what
they are (status `running` / `failed`, unreadable lines counted), never as an exception.
"""

from __future__ import annotations

import fcntl
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from athena.errors import AthenaError

RUN_FILES = ("config.json", "metrics.jsonl", "pretrain.log")  # any one marks a folder as a run's
LOCK_NAME = ".athena.lock"  # athena.training.run_folder.LOCK_NAME (not imported: reading needs no torch)
SEARCH_DEPTH = 3  # multirun/<date>/<time>/<job>: the deepest layout a user points at the top of
# The headline number when nothing is asked for: the first of these a run reports, else its first eval/* number.
PRIMARY_METRICS = ("eval/pass@2", "eval/exact_accuracy", "eval/accuracy", "eval/acc", "eval/perplexity")
LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "bpb", "error", "wall", "mem", "time")


class ReportError(AthenaError):
    """A folder the report cannot read: not a run or multirun, or a run with nothing logged."""


def is_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in RUN_FILES)


def find_runs(folder: Path, depth: int = SEARCH_DEPTH) -> list[Path]:
    """The run folders under `folder` (not `folder` itself), not descending into a run; job order (`2_...` before
    `10_...`)."""
    found = []
    for child in sorted((c for c in folder.iterdir() if c.is_dir()), key=lambda p: natural_key(p.name)):
        if is_run(child):
            found.append(child)
        elif depth > 1 and not child.name.startswith("."):
            found += find_runs(child, depth - 1)
    return found


def natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def flatten(node: Any, prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Nested dicts -> {"a/b": leaf}; lists and empty dicts stay leaves."""
    if not isinstance(node, dict) or (prefix and not node):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}{sep}{key}" if prefix else str(key), sep))
    return out


def is_count(key: str) -> bool:
    """Sizes rather than results (eval/count, eval/num_tasks): constant over a run, not worth a panel or a column."""
    leaf = key.rsplit("/", 1)[-1]
    return leaf.endswith("count") or leaf.startswith("num_")


def lower_is_better(metric: str) -> bool:
    return any(word in metric.lower() for word in LOWER_IS_BETTER)


def default_metric(keys: list[str]) -> str | None:
    for metric in PRIMARY_METRICS:
        if metric in keys:
            return metric
    evals = [k for k in keys if k.startswith("eval/") and not is_count(k)]
    return evals[0] if evals else next((k for k in keys if "loss" in k), None)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class Series:
    """One metric over optimizer steps, one value per step (a resumed run's rewrite of a step wins)."""

    steps: list[int]
    values: list[float]

    @property
    def last(self) -> float:
        return self.values[-1]


@dataclass
class Run:
    path: Path
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    unreadable_lines: int = 0
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # eval/<stem>.json -> its content
    log_lines: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path, name: str | None = None) -> Run:
        path = Path(path)
        run = cls(path=path, name=name or path.name)
        config = _read_json(path / "config.json")
        run.config = config if isinstance(config, dict) else {}
        metrics = path / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text(errors="replace").splitlines():
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a run killed while writing a line
                    run.unreadable_lines += 1
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int):
                    run.rows.append(row)
                else:
                    run.unreadable_lines += 1
        eval_dir = path / "eval"
        if eval_dir.is_dir():
            for file in sorted(eval_dir.glob("*.json"), key=lambda p: (p.stem != "final", p.stem)):
                content = _read_json(file)
                if isinstance(content, dict):
                    run.evals[file.stem] = content
        log = path / "pretrain.log"
        if log.is_file():
            run.log_lines = log.read_text(errors="replace").splitlines()
        return run

    # ------------------------------------------------------------------ state
    @property
    def final(self) -> dict[str, Any] | None:
        return self.evals.get("final")

    @cached_property
    def status(self) -> str:
        """finished (eval/final.json written), running (a live process holds the run-folder lock) or failed."""
        if self.final is not None:
            return "finished"
        return "running" if _lock_held(self.path / LOCK_NAME) else "failed"

    @property
    def last_step(self) -> int | None:
        return max((r["step"] for r in self.rows), default=None)

    @property
    def resumed(self) -> bool:
        """A train step logged twice or out of order: a later attempt continued from a checkpoint."""
        steps = [r["step"] for r in self.rows if any(k.startswith("train/") for k in r)]
        return any(b <= a for a, b in zip(steps, steps[1:]))

    # ------------------------------------------------------------------ metrics
    @cached_property
    def scalar_keys(self) -> list[str]:
        """Every numeric metric key of metrics.jsonl, in order of first appearance (image rows hold paths: left out)."""
        keys: dict[str, None] = {}
        for row in self.rows:
            for key, value in row.items():
                if key not in ("step", "time") and is_number(value):
                    keys.setdefault(key)
        return list(keys)

    def series(self, key: str) -> Series | None:
        by_step: dict[int, float] = {}
        for row in self.rows:
            value = row.get(key)
            if is_number(value):
                by_step[row["step"]] = float(value)
        if not by_step:
            return None
        steps = sorted(by_step)
        return Series(steps, [by_step[s] for s in steps])

    def median(self, key: str) -> float | None:
        """Median over log windows: throughput's first window also holds compilation and warm-up."""
        series = self.series(key)
        finite = [v for v in series.values if math.isfinite(v)] if series else []
        return statistics.median(finite) if finite else None

    def maximum(self, key: str) -> float | None:
        series = self.series(key)
        return max(series.values) if series else None

    def last(self, key: str) -> float | None:
        series = self.series(key)
        return series.last if series else None

    @property
    def wall_seconds(self) -> float | None:
        """From the start of the first logged training window to the last metrics row, on the clock metrics.jsonl
        stamps (model and data set-up before the first step are not in it; a resumed run's pause is)."""
        timed = [r for r in self.rows if is_number(r.get("time"))]
        if not timed:
            return None
        first, last = timed[0], timed[-1]
        span = last["time"] - first["time"]
        train = self.config.get("train") or {}
        batch, every, speed = train.get("global_batch_size"), train.get("log_every"), first.get("train/samples_per_s")
        if is_number(batch) and is_number(speed) and speed > 0:
            steps = min(first["step"], every) if is_number(every) else first["step"]
            span += steps * batch / speed  # the first window, before its row was stamped, at its own speed
        return span

    # ------------------------------------------------------------------ pretrain.log
    def log_match(self, pattern: str) -> re.Match | None:
        """The last pretrain.log line matching `pattern` (a resumed run logs its set-up again)."""
        regex = re.compile(pattern)
        for line in reversed(self.log_lines):
            found = regex.search(line)
            if found:
                return found
        return None

    @property
    def trainable_params(self) -> tuple[int, int | None] | None:
        """(trainable, total or None) parameters: a logged `*trainable_params` metric if the run logs one, else the
        recipe's pretrain.log line."""
        for key in self.scalar_keys:
            if key.endswith("trainable_params"):
                return int(self.last(key)), None
        found = self.log_match(r"trainable parameters: (\d+) of (\d+)")
        return (int(found.group(1)), int(found.group(2))) if found else None

    def log_tail(self, lines: int = 12) -> list[str]:
        return self.log_lines[-lines:]


def load_run(folder: Path) -> Run:
    """A single run to report on: it must have logged at least one metric."""
    run = Run.load(folder)
    if not run.rows:
        why = ("has no metrics.jsonl" if not (folder / "metrics.jsonl").is_file()
               else "holds no metrics rows (the run stopped before its first log step, train.log_every)")
        raise ReportError(f"{folder} {why}: nothing to report; pass a run that trained at least one log step")
    return run


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _lock_held(lock: Path) -> bool:
    """Whether a live process holds the run folder's flock (athena.training.run_folder): a shared lock fails then."""
    if not lock.is_file():
        return False
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
