"""A run killed with SIGKILL at random moments (saves included) and restarted with resume=auto
ends with exactly the parameters of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from athena.checkpoint import step_files
from helpers import ONE_THREAD_ENV, ROOT, run_script, wait_until_training

pytestmark = pytest.mark.slow  # end-to-end runs in subprocesses

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

    # what a kill during torch.save leaves behind: a partial temp file, which resume must ignore (and remove)
    partial = run_dir / "checkpoints" / f".step_{kills_after[-1] + 3}.pt.tmp-999"
    partial.write_bytes(os.urandom(1000))
    run_script("pretrain.py", *OVERRIDES, f"hydra.run.dir={run_dir}", "resume=auto", data_root=data_root)
    assert not partial.exists()

    # Every restart really continued (a run from scratch would also end with the reference's weights): the log
    # names the step each one resumed from (at or after the newest step file seen before its kill), metrics.jsonl
    # has every log step, and step 3 only once: a restart from scratch would log it again. (Other steps may appear
    # twice: a window logged after the last checkpoint and before a kill is logged again by the restart.)
    log = (run_dir / "pretrain.log").read_text()
    resumed_at = [int(line.rsplit(" at step ", 1)[1]) for line in log.splitlines() if "resumed from" in line]
    assert len(resumed_at) == 3 and all(r >= k for r, k in zip(resumed_at, kills_after)), (resumed_at, kills_after)
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = sorted(set(logged))
    assert train_steps == list(range(3, 61, 3)), train_steps
    assert logged.count(3) == 1, logged

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
    wait_until_training(run_dir / "metrics.jsonl")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: stopped by a signal at step") and "resume=auto" in last, last
    step = int(last.split("at step ")[1].split(";")[0])
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == step > 0
