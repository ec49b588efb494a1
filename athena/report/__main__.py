"""`python -m athena.report FOLDER`: prints each file it writes, one a line, report.md last; a folder it cannot read
ends in one `error: ...` line."""

from __future__ import annotations

import argparse

from athena.cli import exit_with_error
from athena.errors import AthenaError
from athena.report import write_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m athena.report", description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="a run folder (outputs/<date>/<time>) or a multirun folder")
    parser.add_argument("--out", help="where to write the report (default: <folder>/report)")
    parser.add_argument("--sort", help="multirun: the column to order jobs by, e.g. eval/exact_accuracy or train.lr")
    parser.add_argument("--order", choices=("asc", "desc"),
                        help="multirun: sort direction (default: best first; lower is better for losses, "
                             "perplexity, memory and time)")
    parser.add_argument("--metric", help="multirun: the metric plotted across jobs (default: the --sort column if it "
                                         "is a metric, else the main eval score)")
    parser.add_argument("--baseline", help="AutoRank sweep: another search's folder (or its autorank_trials.jsonl), "
                                           "e.g. random search, whose best-so-far curve is drawn beside")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.folder, args.out, sort=args.sort, order=args.order, metric=args.metric,
                               baseline=args.baseline)
    except AthenaError as error:
        exit_with_error(str(error))
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
