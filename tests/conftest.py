"""Shared fixtures: every test builds its data under a temp folder and runs on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is as fast and does not stall when other processes load the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One dataset cache for the whole session (datasets are keyed by their build spec)."""
    return tmp_path_factory.mktemp("data")


# One intra-op thread for training subprocesses: the resume tests compare runs bit for bit, and with two threads
# full-suite runs saw last-bit divergences between two identical runs (cause not found yet; see the issue notes).
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def script_env(data_root: Path, full_errors: bool = True) -> dict[str, str]:
    """The environment a test runs a script in: CPU, one thread, offline W&B, its own data cache. full_errors: Hydra
    shows whole tracebacks (what a failing test should print); False is what a user sees."""
    env = {**os.environ, **ONE_THREAD_ENV, "ATHENA_DATA_DIR": str(data_root), "CUDA_VISIBLE_DEVICES": "",
           "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
    if not full_errors:
        del env["HYDRA_FULL_ERROR"]
    return env


def run_script(script: str, *overrides: str, data_root: Path, timeout: int = 300, check: bool = True,
               full_errors: bool = True):
    """Run pretrain.py / evaluate.py as a user would, in a subprocess on the CPU."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=ROOT,
                          env=script_env(data_root, full_errors), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(overrides)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def last_line_error(proc: subprocess.CompletedProcess) -> str:
    """The one line a failed run ends with; asserts it failed, ended with `error: ...` and printed no traceback."""
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"expected a failure:\n{output[-3000:]}"
    assert "Traceback" not in output and "HYDRA_FULL_ERROR" not in output, output[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), output[-3000:]
    return last


def fingerprint(folder: Path) -> dict[str, str]:
    """sha256 of every result file under a run folder (relative path -> digest): equal before and after means no
    result changed. pretrain.log (a refused attempt appends its lines: a record, not a result) and the lock file (it
    names the process holding the folder) are left out."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name not in ("pretrain.log", ".athena.lock")}
