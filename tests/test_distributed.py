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
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from athena.config import ConfigError, validate_config
from conftest import CONF, ROOT, run_script

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


def test_poly_adapter_under_two_processes_equals_one_process_with_the_same_slots(runs, tmp_path, data_root):
    """Adapters under DDP: only trainable parameters are synced, and the router loss (a per-micro-batch mean,
    like each rank's) gives the same update as one process whose micro-batches are the ranks' shards."""
    dirs, _ = runs
    base = f"init_from={dirs['single']}/checkpoints/last.pt"
    adapted = (*COMMON, "adapter=poly", base, "train.steps=10", "train.eval_every=null", "train.checkpoint_every=null")
    torchrun(*adapted, f"hydra.run.dir={tmp_path / 'ddp'}", data_root=data_root)
    run_script("pretrain.py", *adapted, "train.grad_accum_steps=2", f"hydra.run.dir={tmp_path / 'accum2'}",
               data_root=data_root)
    ddp, accum = load(tmp_path / "ddp"), load(tmp_path / "accum2")
    frozen = load(dirs["single"])["ema"]  # the EMA weights are the base that init_from loaded
    assert any("expert_A" in name for name in ddp["model"])  # the poly adapter is really there
    for name, tensor in accum["model"].items():
        torch.testing.assert_close(ddp["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
        base_name = name.replace(".base_layer.", ".")
        if base_name in frozen:  # frozen base: bit-identical to the pretrained weights on every rank
            assert torch.equal(ddp["model"][name], frozen[base_name]), name
    for a, b in zip(train_rows(tmp_path / "ddp"), train_rows(tmp_path / "accum2"), strict=True):
        assert a["train/router_loss"] == pytest.approx(b["train/router_loss"], rel=1e-6), a["step"]


def test_batch_not_divisible_by_world_size_is_one_line(tmp_path, data_root):
    proc = torchrun(*COMMON, "train.global_batch_size=30", "train.grad_accum_steps=2", f"hydra.run.dir={tmp_path}",
                    data_root=data_root, check=False)
    assert proc.returncode != 0
    assert "error: train.global_batch_size 30 must be divisible by world_size 2" in proc.stderr


# ----------------------------------------------------------------- train.parallel=fsdp (FSDP2, fully_shard)
# The same smoke run with the dense weights, gradients, optimizer and EMA state sharded over the 2 processes. FSDP
# reduce-scatters (sums) the gradients, which here is exactly the one-process accumulation; only the gradient norm is
# taken over the shards and rounds differently (~1e-8 relative), so while clipping is active (the first ~10 smoke
# steps) the weights drift apart by ~1e-6, and SignSGD can turn that into a full-lr sign flip of a puzzle row. The
# strict comparison therefore runs without clipping (the norm is still computed and logged); the clipped path is
# the resume tests' (clip 1.0).
FSDP = (*COMMON, "train.grad_clip=null", "train.parallel=fsdp")


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, data_root):
    """FSDP2 over 2 gloo processes, and 1 process with 2 accumulation steps (the same slots), both unclipped."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("fsdp", "fsdp_accum2")}
    run_script("pretrain.py", *COMMON, "train.grad_clip=null", "train.grad_accum_steps=2",
               f"hydra.run.dir={dirs['fsdp_accum2']}", data_root=data_root)
    proc = torchrun(*FSDP, f"hydra.run.dir={dirs['fsdp']}", data_root=data_root)
    return dirs, proc


def test_fsdp_two_processes_equal_one_process_with_the_same_slots(fsdp_runs):
    dirs, _ = fsdp_runs
    run_dir = dirs["fsdp"]
    assert "FSDP2: dense weights, gradients and optimizer state sharded over 2 processes" in \
        (run_dir / "pretrain.log").read_text()
    for step in ("step_10.pt", "last.pt"):
        fsdp, accum = load(run_dir, step), load(dirs["fsdp_accum2"], step)
        assert fsdp["model"]["puzzle_embedding.weight"].abs().sum() > 0  # the replicated sparse path was trained
        # Full, unsharded tensors in the checkpoint: the layout of a one-process checkpoint.
        for part in ("model", "ema"):
            assert fsdp[part].keys() == accum[part].keys()
            for name, tensor in accum[part].items():
                assert type(fsdp[part][name]) is torch.Tensor
                torch.testing.assert_close(fsdp[part][name], tensor, rtol=0, atol=1e-6, msg=f"{step} {part}.{name}")
        for mine, theirs in zip(fsdp["optimizers"], accum["optimizers"], strict=True):
            assert mine["param_groups"] == theirs["param_groups"] and mine["state"].keys() == theirs["state"].keys()
            for i, state in theirs["state"].items():
                for key, value in state.items():
                    if torch.is_tensor(value):
                        torch.testing.assert_close(mine["state"][i][key], value, rtol=0, atol=1e-6, msg=f"{i}.{key}")
                    else:
                        assert mine["state"][i][key] == value
    for a, b in zip(train_rows(run_dir), train_rows(dirs["fsdp_accum2"]), strict=True):
        for key in ("train/loss", "train/lm_loss", "train/grad_norm", "train/accuracy", "train/halted_per_step"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)
    # The sharded model's evals (EMA weights swapped into the shards, every rank its part of the split) equal
    # one process's: the periodic one at step 10 and the final one.
    evals = [[{k: v for k, v in r.items() if k != "time"} for r in
              (json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()) if "eval/count" in r]
             for d in (run_dir, dirs["fsdp_accum2"])]
    assert [r["step"] for r in evals[0]] == [10, 20]
    for mine, theirs in zip(*evals, strict=True):
        assert mine == pytest.approx(theirs, abs=1e-6)


def test_fsdp_final_eval_equals_evaluate_py_on_its_checkpoint(fsdp_runs, data_root):
    run_dir = fsdp_runs[0]["fsdp"]
    run_script("evaluate.py", f"checkpoint={run_dir}/checkpoints/last.pt", "eval.name=again", data_root=data_root)
    final = json.loads((run_dir / "eval" / "final.json").read_text())
    again = json.loads((run_dir / "eval" / "again.json").read_text())
    for key in ("count", "exact_accuracy", "token_accuracy", "exact_accuracy_by_step", "halt_step_counts"):
        assert again[key] == pytest.approx(final[key], abs=1e-6), key


def test_fsdp_resume_with_two_processes_equals_uninterrupted(fsdp_runs, tmp_path, data_root):
    run_dir = fsdp_runs[0]["fsdp"]
    torchrun(*FSDP, "train.eval_every=null", f"hydra.run.dir={tmp_path}",
             f"resume={run_dir}/checkpoints/step_10.pt", data_root=data_root)
    uninterrupted, resumed = load(run_dir, "step_20.pt"), load(tmp_path, "step_20.pt")
    for part in ("model", "ema"):
        for name, tensor in uninterrupted[part].items():
            assert torch.equal(tensor, resumed[part][name]), f"{part}.{name} differs after resume"
    for mine, theirs in zip(resumed["optimizers"], uninterrupted["optimizers"], strict=True):
        for i, state in theirs["state"].items():
            for key, value in state.items():
                theirs_value = mine["state"][i][key]
                same = torch.equal(theirs_value, value) if torch.is_tensor(value) else theirs_value == value
                assert same, f"optimizer state {i}.{key} differs after resume"


def test_checkpoints_move_between_fsdp_ddp_and_one_process(runs, fsdp_runs, tmp_path, data_root):
    dirs, _ = runs
    run_dir = fsdp_runs[0]["fsdp"]
    # An FSDP checkpoint in one process (train.parallel=fsdp there only warns).
    proc = run_script("pretrain.py", *FSDP, "train.eval_every=null",
                      f"hydra.run.dir={tmp_path / 'one'}", f"resume={run_dir}/checkpoints/step_10.pt",
                      data_root=data_root)
    output = proc.stdout + proc.stderr
    assert "train.parallel=fsdp needs torchrun with more than one process; running as one process" in output
    assert load(tmp_path / "one")["step"] == 20
    # A ddp checkpoint (full replicated state) scattered into FSDP shards, with clipping: weights, Adam moments,
    # EMA and the per-rank slots all continue, so the run ends where the ddp run itself ended (to the rounding of
    # the sharded clip norm).
    torchrun(*COMMON, "train.parallel=fsdp", "train.eval_every=null", f"hydra.run.dir={tmp_path / 'fsdp'}",
             f"resume={dirs['ddp']}/checkpoints/step_10.pt", data_root=data_root)
    ddp, fsdp = load(dirs["ddp"], "step_20.pt"), load(tmp_path / "fsdp", "step_20.pt")
    for part in ("model", "ema"):
        for name, tensor in ddp[part].items():
            torch.testing.assert_close(fsdp[part][name], tensor, rtol=0, atol=1e-5, msg=f"{part}.{name}")


def test_fsdp_with_compile_is_one_line_before_any_work():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["train.parallel=fsdp", "train.compile=true"])
    with pytest.raises(ConfigError, match="train.compile=true is not supported with train.parallel=fsdp yet"):
        validate_config(OmegaConf.to_container(cfg, resolve=True))
