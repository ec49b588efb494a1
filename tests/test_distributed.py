"""Multi-process training: `torchrun --nproc_per_node=2 pretrain.py` on the CPU (gloo), against one process.

Why the strict comparison is with grad_accum_steps=2: rank r takes slots [16r, 16r+16) of each global batch of
32, exactly what micro-batch r is in one process with 2 accumulation steps (its own carry, the same per-slot
halting), and the summed gradients then agree bit for bit. Against grad_accum_steps=1 the matrix products run on
a batch of 32 instead of 16 and round differently (~1e-7); this tiny recursive model and Adam-atan2 amplify
that, and SignSGD turns a near-zero puzzle-embedding gradient into a full-lr sign flip after ~12 steps, so that
comparison is loose (losses, and weights at step 10).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_script

# Exploration off: halting is then a deterministic function of the weights, the same in every layout.
COMMON = ("experiment=smoke", "arch.halt_exploration_prob=0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*overrides: str, data_root, nproc: int = 2, check: bool = True, timeout: int = 180):
    env = {**os.environ, "ATHENA_DATA_DIR": str(data_root), "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "offline",
           "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   f"--master_port={free_port()}", str(ROOT / "pretrain.py"), *overrides]
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        # Once in dozens of launches a rank died of SIGABRT inside gloo's start-up, before any training (seen on
        # this 2-core machine, not reproduced since): retry such a launch once, never a failure of our own code.
        if not (proc.returncode != 0 and "SIGABRT" in proc.stderr and "train:" not in proc.stderr):
            break
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(overrides)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/lm_loss" in r]


def load(run_dir, name="last.pt"):
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run, one process or two, on 1 BLAS thread: another thread count rounds (and so drifts) differently."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    """The same 20 smoke steps three ways: 2 processes, 1 process with 2 accumulation steps, 1 process."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("ddp", "accum2", "single")}
    run_script("pretrain.py", *COMMON, f"hydra.run.dir={dirs['single']}", data_root=data_root)  # builds the data
    proc = torchrun(*COMMON, f"hydra.run.dir={dirs['ddp']}", data_root=data_root)
    run_script("pretrain.py", *COMMON, "train.grad_accum_steps=2", f"hydra.run.dir={dirs['accum2']}",
               data_root=data_root)
    return dirs, proc


def test_two_processes_equal_one_process_with_the_same_slots(runs):
    dirs, _ = runs
    ddp, accum = load(dirs["ddp"]), load(dirs["accum2"])
    assert ddp["model"]["puzzle_embedding.weight"].abs().sum() > 0  # the sparse path was trained
    for part in ("model", "ema"):
        for name, tensor in accum[part].items():
            torch.testing.assert_close(ddp[part][name], tensor, rtol=0, atol=1e-6, msg=f"{part}.{name}")
    for a, b in zip(train_rows(dirs["ddp"]), train_rows(dirs["accum2"]), strict=True):
        for key in ("train/loss", "train/lm_loss", "train/grad_norm", "train/accuracy", "train/halted_per_step"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)
    # Every rank evaluated its shard; the all-reduced result is the whole test split's.
    final_ddp = json.loads((dirs["ddp"] / "eval" / "final.json").read_text())
    final_accum = json.loads((dirs["accum2"] / "eval" / "final.json").read_text())
    for key in ("count", "exact_accuracy", "token_accuracy", "exact_accuracy_by_step", "halt_step_counts"):
        assert final_ddp[key] == pytest.approx(final_accum[key], abs=1e-6), key


def test_two_processes_track_one_process_with_the_global_batch(runs):
    dirs, _ = runs
    for a, b in zip(train_rows(dirs["ddp"]), train_rows(dirs["single"]), strict=True):
        assert a["train/lm_loss"] == pytest.approx(b["train/lm_loss"], rel=1e-3), a["step"]
    ddp, single = load(dirs["ddp"], "step_10.pt"), load(dirs["single"], "step_10.pt")
    for name, tensor in single["model"].items():  # puzzle embedding included
        torch.testing.assert_close(ddp["model"][name], tensor, rtol=0, atol=1e-4, msg=name)


def test_only_rank_zero_writes_and_checkpoints_keep_every_ranks_slots(runs):
    dirs, proc = runs
    run_dir = dirs["ddp"]
    assert proc.stdout.count("[athena] run folder:") == 1  # rank 0 alone prints the summary
    assert [r["step"] for r in train_rows(run_dir)] == [5, 10, 15, 20]  # one writer
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["last.pt", "step_10.pt", "step_20.pt"]
    state = load(run_dir)
    assert state["world_size"] == 2 and len(state["rank_rng"]) == 2
    assert len(state["carries"]) == 2  # [rank][micro-batch]
    assert all(len(c) == 1 and c[0]["z_H"].shape[0] == 16 for c in state["carries"])


def test_resume_with_two_processes_equals_uninterrupted(runs, tmp_path, data_root):
    dirs, _ = runs
    torchrun(*COMMON, f"hydra.run.dir={tmp_path}", f"resume={dirs['ddp']}/checkpoints/step_10.pt",
             data_root=data_root)
    uninterrupted, resumed = load(dirs["ddp"], "step_20.pt"), load(tmp_path, "step_20.pt")
    for part in ("model", "ema"):
        for name, tensor in uninterrupted[part].items():
            assert torch.equal(tensor, resumed[part][name]), f"{part}.{name} differs after resume"


def test_a_two_process_checkpoint_resumes_in_one_process_with_fresh_slots(runs, tmp_path, data_root):
    dirs, _ = runs
    proc = run_script("pretrain.py", *COMMON, f"hydra.run.dir={tmp_path}", "train.eval_every=null",
                      f"resume={dirs['ddp']}/checkpoints/step_10.pt", data_root=data_root)
    assert "restart from fresh carries" in proc.stderr + proc.stdout
    state = load(tmp_path)
    assert state["step"] == 20 and state["world_size"] == 1 and len(state["carries"]) == 1


def test_batch_not_divisible_by_world_size_is_one_line(tmp_path, data_root):
    proc = torchrun(*COMMON, "train.global_batch_size=30", "train.grad_accum_steps=2", f"hydra.run.dir={tmp_path}",
                    data_root=data_root, check=False)
    assert proc.returncode != 0
    assert "error: train.global_batch_size 30 must be divisible by world_size 2" in proc.stderr
