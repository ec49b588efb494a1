"""What tests share besides fixtures (those are in conftest.py): paths, running the scripts as a user would and
reading how they end, composing configs, and the toy TRM that model tests build. Tests import from here, never
from each other."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import athena.config  # noqa: F401  (registers the ${default:...} resolver conf/ reads)
from athena.models import TinyRecursiveModel

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

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
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name not in ("pretrain.log", ".athena.lock")}


def composed(*overrides: str) -> dict:
    """The resolved config `pretrain.py OVERRIDES...` would run with (not validated)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


# ----------------------------------------------------------------- the toy TRM of the model tests
VOCAB, SEQ, NUM_IDS = 6, 16, 7


def small_model(**overrides) -> TinyRecursiveModel:
    kwargs = dict(
        vocab_size=VOCAB, seq_len=SEQ, num_puzzle_identifiers=NUM_IDS, hidden_size=32, num_heads=4, expansion=2.0,
        num_layers=2, H_cycles=2, L_cycles=3, halt_max_steps=4, halt_exploration_prob=0.0, puzzle_emb_len=2,
    )  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(0)
    return TinyRecursiveModel(**kwargs)


def make_batch(batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, VOCAB, (batch_size, SEQ), generator=g)
    labels[:, -1] = -100  # one ignored cell per sequence
    return {
        "inputs": torch.randint(1, VOCAB, (batch_size, SEQ), generator=g),
        "labels": labels,
        "puzzle_identifiers": torch.randint(0, NUM_IDS, (batch_size,), generator=g),
    }


def wait_until_training(metrics: Path, timeout: float = 120) -> None:
    """Return once metrics.jsonl holds a logged training step: the loop, which saves a checkpoint on SIGTERM/SIGINT,
    is running. The file alone exists from set-up on, and a signal then stops the run before any step (with its own
    line, tests/training/test_signal_outside_loop.py), not with the checkpoint a test waits for."""
    deadline = time.time() + timeout
    while not (metrics.exists() and '"train/' in metrics.read_text()) and time.time() < deadline:
        time.sleep(0.05)
