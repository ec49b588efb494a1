"""Plots and a Markdown summary of a run folder, or a comparison of the jobs of a multirun.

    python -m athena.report outputs/<date>/<time>                 # -> outputs/<date>/<time>/report/report.md
    python -m athena.report multirun/<date>/<time> --sort eval/exact_accuracy [--metric ...] [--out DIR]
    python -m athena.report multirun/autorank/<date>/<time> [--baseline <random-search sweep>]   # + AutoRank part

A folder with config.json, metrics.jsonl or pretrain.log is a run; a folder whose subfolders (up to three levels
down) are runs is a multirun. Only reads the runs; everything is written under `out` (default <folder>/report).
"""

from __future__ import annotations

from pathlib import Path

from athena.report.runs import ReportError, Run, find_runs, is_run, load_run

__all__ = ["ReportError", "Run", "write_report"]


def write_report(folder: str | Path, out: str | Path | None = None, sort: str | None = None,
                 order: str | None = None, metric: str | None = None, baseline: str | Path | None = None) -> list[Path]:
    """Write the report of a run or multirun folder; the files written, report.md last. An AutoRank sweep (its
    folder holds autorank_trials.jsonl) also gets autorank.md and its figures, beside `baseline`'s trials if given."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder} is not a folder; pass a run folder (outputs/<date>/<time>) or a multirun folder "
                          "(multirun/<date>/<time>)")
    out = Path(out) if out else folder / "report"
    if is_run(folder):
        if sort or metric:
            raise ReportError("--sort and --metric compare the jobs of a multirun; "
                              f"{folder} is a single run (drop them)")
        run = load_run(folder)
        from athena.report.markdown import write_run_report  # matplotlib: after the input is known to be readable

        return write_run_report(run, out)
    jobs = [path for path in find_runs(folder) if out.resolve() not in (path.resolve(), *path.resolve().parents)]
    if not jobs:
        raise ReportError(f"{folder} is neither a run folder (no config.json, metrics.jsonl or pretrain.log) nor a "
                          "multirun folder (no run folders below it); pass outputs/<date>/<time> or "
                          "multirun/<date>/<time>")
    runs = [Run.load(path, name=path.relative_to(folder).as_posix()) for path in jobs]
    from athena.report.autorank import is_autorank_sweep, write_autorank_report
    from athena.report.sweep import write_sweep_report

    if baseline is not None and not is_autorank_sweep(folder):
        raise ReportError(f"--baseline compares AutoRank searches; {folder} holds no autorank_trials.jsonl")
    extra = []
    if is_autorank_sweep(folder):
        extra = write_autorank_report(folder, out, Path(baseline) if baseline else None)
    written = write_sweep_report(folder, runs, out, sort=sort, order=order, metric=metric)
    return [*written[:-1], *extra, written[-1]]
