"""SIGTERM / Ctrl-C before the training loop (here: while the dataset builds) stop the run with one line, leave no
half-built dataset and free the run folder; the loop's own checkpoint-then-stop handling is tested in
tests/test_sweeps.py and tests/training/test_kill_resume.py."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, script_env

pytestmark = pytest.mark.slow  # a pretrain.py subprocess


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_set_up_stops_with_one_line(tmp_path, signum):
    data_root, run_dir = tmp_path / "data", tmp_path / "run"
    # 6x6 Sudoku with 2,000 puzzles: a build of a few seconds, long enough to be inside it when the signal comes
    overrides = ["data=sudoku6", "data.build.num_train=2000", "train.steps=5", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain.py"), *overrides], cwd=ROOT,
                            env=script_env(data_root, full_errors=False), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:  # PYTHONUNBUFFERED: each line as it is printed
        if line.startswith("building dataset at") or time.time() > deadline:
            break
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 1, (proc.returncode, err[-2000:])
    assert lines[-1] == (f"error: stopped by {name} during set-up, before any training step; nothing to keep: "
                         "run the command again"), err[-2000:]
    assert "Traceback" not in err
    built = [p.name for p in data_root.iterdir()] if data_root.exists() else []
    assert not [n for n in built if n.startswith("sudoku6")], built  # the build's temp folder is removed, not renamed
    assert not (run_dir / "checkpoints").exists()
    if signum == signal.SIGINT:
        return  # one rerun shows the folder's lock is free (below); the handler is the same for both signals
    # the folder's lock is free: the same command runs to the end in it
    done = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), "experiment=smoke", f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, env=script_env(data_root), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
