"""One run per run folder: an advisory lock held for the life of the process that writes there.

Two runs in one folder would overwrite each other's checkpoints and config.json and interleave metrics.jsonl. The
lock is `flock` on <run dir>/.athena.lock: the kernel drops it when the process ends however it ends (SIGKILL
included), so a killed run never leaves the folder locked, and the file names the holder for the error message.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from athena.errors import AthenaError

LOCK_NAME = ".athena.lock"


class RunFolderBusy(AthenaError, RuntimeError):
    """Another live process holds the run folder."""


class RunFolderLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._file = None

    def acquire(self) -> "RunFolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # not "w": truncating before we hold the lock would erase the holder's name
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunFolderBusy(f"run folder {self.path.parent} is in use by {holder}; wait for it to finish, stop "
                                "it, or choose another hydra.run.dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
