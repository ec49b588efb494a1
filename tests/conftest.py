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


def run_script(script: str, *overrides: str, data_root: Path, timeout: int = 300, check: bool = True):
    """Run pretrain.py / evaluate.py as a user would, in a subprocess on the CPU."""
    env = {**os.environ, **ONE_THREAD_ENV, "ATHENA_DATA_DIR": str(data_root), "CUDA_VISIBLE_DEVICES": "",
           "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(overrides)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
