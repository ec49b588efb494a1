"""A run killed with SIGKILL at random moments (saves included) and restarted with resume=auto
ends with exactly the parameters of an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import torch

from conftest import ONE_THREAD_ENV, ROOT, run_script
from athena.training.checkpoint import step_files

OVERRIDES = ("experiment=smoke", "train.steps=60", "train.checkpoint_every=3", "train.log_every=3",
             "train.eval_every=null")


def _start(run_dir, data_root) -> subprocess.Popen:
    env = {**os.environ, **ONE_THREAD_ENV, "ATHENA_DATA_DIR": str(data_root), "CUDA_VISIBLE_DEVICES": "",
           "WANDB_MODE": "disabled"}
    return subprocess.Popen([sys.executable, str(ROOT / "pretrain.py"), *OVERRIDES, f"hydra.run.dir={run_dir}",
                             "resume=auto"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _newest_step(directory) -> int:
    found = step_files(directory) if directory.exists() else []
    return found[-1][0] if found else 0


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, data_root):
    reference = tmp_path / "reference"
    run_script("pretrain.py", *OVERRIDES, f"hydra.run.dir={reference}", data_root=data_root)

    run_dir, rng = tmp_path / "killed", random.Random(0)
    kills_after = []
    for _ in range(3):
        before = _newest_step(run_dir / "checkpoints")
        proc = _start(run_dir, data_root)
        deadline = time.time() + 120
        while _newest_step(run_dir / "checkpoints") <= before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))  # somewhere in the next steps or the next save
        assert proc.poll() is None, "the run finished before it could be killed; lengthen it"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills_after.append(_newest_step(run_dir / "checkpoints"))
    assert kills_after == sorted(kills_after) and kills_after[-1] < 60

    # what a kill during torch.save leaves behind: a partial temp file, which resume must ignore
    (run_dir / "checkpoints" / f".step_{kills_after[-1] + 3}.pt.tmp-999").write_bytes(os.urandom(1000))
    run_script("pretrain.py", *OVERRIDES, f"hydra.run.dir={run_dir}", "resume=auto", data_root=data_root)

    expected = torch.load(reference / "checkpoints" / "step_60.pt", weights_only=True)
    resumed = torch.load(run_dir / "checkpoints" / "step_60.pt", weights_only=True)
    for part in ("model", "ema"):
        for name, tensor in expected[part].items():
            assert torch.equal(tensor, resumed[part][name]), f"{part}.{name} differs after kills at {kills_after}"


def test_sigterm_saves_a_checkpoint_and_says_how_to_continue(tmp_path, data_root):
    run_dir = tmp_path / "run"
    env = {**os.environ, **ONE_THREAD_ENV, "ATHENA_DATA_DIR": str(data_root), "CUDA_VISIBLE_DEVICES": "",
           "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain.py"), "experiment=smoke", "train.steps=100000",
                             "train.checkpoint_every=null", "train.eval_every=null", f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: stopped by a signal at step") and "resume=auto" in last, last
    step = int(last.split("at step ")[1].split(";")[0])
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == step > 0
