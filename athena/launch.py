"""torchrun with Athena's one-line errors.

    python -m athena.launch --nproc_per_node=4 pretrain.py experiment=sudoku_extreme_1k hydra.run.dir=outputs/x

Takes torchrun's arguments unchanged and runs torchrun itself. The difference is only in how a failure ends: plain
torchrun ends a run whose process stopped on a user error (a bad config, missing data, an unusable checkpoint) with
its own traceback and failure table (whose `traceback :` field carries the process's one line); this launcher
ends it with that one line, exit status 1.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main


def root_cause(error: ChildFailedError) -> str:
    """The first failing process's message: its error file's line (athena.cli.exit_with_error writes one), or how
    it ended (exit code, signal) when it left none."""
    rank, failure = error.get_first_failure()
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    line = str(message).strip().splitlines()[-1] if str(message).strip() else ""
    if line.startswith("error: "):
        return line
    how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    return f"error: process {rank} failed ({how}); its output above says why"


def main(argv: list[str] | None = None) -> None:
    try:
        torchrun_main(argv)
    except ChildFailedError as error:
        sys.exit(root_cause(error))


if __name__ == "__main__":
    main()
