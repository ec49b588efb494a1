"""Multi-process training: `torchrun --nproc_per_node=2 pretrain.py` on the CPU (gloo), against one process.

Why whole runs are compared with grad_accum_steps=2: rank r takes slots [16r, 16r+16) of each global batch of
32, exactly what micro-batch r is in one process with 2 accumulation steps (its own carry, the same per-slot
halting), so both do the same float operations (a two-term sum is the same in either order) and agree bit for bit.
Against grad_accum_steps=1 the matrix products run on 32 rows instead of 16 and round differently (~1e-7); a halting
decision (discrete) can flip on that and change which samples train next, so a whole run of that layout is no fair
comparison on any CPU. That layout is checked where it is exact up to rounding: the gradient of the first step.
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
from helpers import CONF, ROOT, run_script

pytestmark = pytest.mark.slow  # end-to-end runs in subprocesses

# Exploration off: halting is then a deterministic function of the weights, the same in every layout.
COMMON = ("experiment=smoke", "arch.halt_exploration_prob=0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*overrides: str, data_root, nproc: int = 2, check: bool = True, timeout: int = 180,
             launcher: str = "torch.distributed.run"):
    env = {**os.environ, "ATHENA_DATA_DIR": str(data_root), "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "offline",
           "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        command = [sys.executable, "-m", launcher, f"--nproc_per_node={nproc}",
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


def assert_resumed(run_dir, checkpoint: str, step: int, first_logged: int) -> None:
    """The run continued from `checkpoint` (a run from scratch would reach the same end state: equality of the end
    state alone cannot tell), and its first logged window follows that checkpoint's step."""
    assert f"resumed from {checkpoint} at step {step}" in (run_dir / "pretrain.log").read_text()
    assert train_rows(run_dir)[0]["step"] == first_logged


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
            assert torch.equal(ddp[part][name], tensor), f"{part}.{name}"  # exact: see the module docstring
    for a, b in zip(train_rows(dirs["ddp"]), train_rows(dirs["accum2"]), strict=True):
        for key in ("train/loss", "train/lm_loss", "train/grad_norm", "train/accuracy", "train/halted_per_step"):
            assert a[key] == b[key], (a["step"], key)
    # Every rank evaluated its shard; the all-reduced result is the whole test split's.
    final_ddp = json.loads((dirs["ddp"] / "eval" / "final.json").read_text())
    final_accum = json.loads((dirs["accum2"] / "eval" / "final.json").read_text())
    for key in ("count", "exact_accuracy", "token_accuracy", "exact_accuracy_by_step", "halt_step_counts"):
        assert final_ddp[key] == pytest.approx(final_accum[key], abs=1e-6), key


def _rank_gradients(rank: int, world: int, port: int, out_path: str) -> None:
    """One rank of the gradient check: its contiguous slice of the global batch, loss / GLOBAL batch size, backward,
    then athena's gradient sync (flat dense all-reduce + all-gathered sparse puzzle rows)."""
    import torch.distributed as dist

    from athena.training import distributed
    from helpers import make_batch, small_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, batch = small_model(), make_batch(GLOBAL_BATCH, seed=3)
        local = {k: v.chunk(world)[rank] for k, v in batch.items()}
        _, out = model(model.initial_carry(local), local)
        (out.loss / GLOBAL_BATCH).backward()
        dense, sparse = model.param_groups()
        distributed.sync_gradients(dense, sparse)
        if rank == 0:
            torch.save(_gradients(model), out_path)
    finally:
        dist.destroy_process_group()


def _gradients(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for n, p in model.named_parameters()
            if p.grad is not None}


GLOBAL_BATCH = 32


def test_two_processes_compute_the_gradient_of_the_global_batch(tmp_path):
    """What a 2-process step means: the summed gradients of the ranks' halves (each loss divided by the global batch
    size, sparse puzzle rows gathered) ARE the gradient of the whole batch in one process. Compared on the first
    step, from fresh slots, so no halting decision (discrete) stands between the two computations; later steps can
    legitimately part (a last-bit difference can flip a halt), which is why training runs are compared only in the
    exact same-slots layout above.

    Tolerance: the two sides are the same float32 arithmetic except how sums are split (matmuls over 16 vs 32 rows,
    then one two-term sum across ranks). float32 rounds at 2**-24 = 6e-8 relative per operation, and a gradient element
    here passes through ~50 matmul/reduction steps (2 H-cycles x 4 network calls x 2 layers, forward and back): a few
    1e-7 of the tensor's largest entry (2.7e-7 measured on an x86-64 CPU). 1e-5 leaves ~40x for other CPUs' kernels
    and is still ~1e5x below a real mistake (a missing rank, a mean instead of a sum, a lost sparse row each change
    gradients by O(1) of their size)."""
    import torch.multiprocessing as mp

    from helpers import make_batch, small_model

    out_path = tmp_path / "rank0.pt"
    mp.spawn(_rank_gradients, args=(2, free_port(), str(out_path)), nprocs=2, join=True)
    two = torch.load(out_path, weights_only=True)

    torch.set_num_threads(1)
    model, batch = small_model(), make_batch(GLOBAL_BATCH, seed=3)
    _, out = model(model.initial_carry(batch), batch)
    (out.loss / GLOBAL_BATCH).backward()
    one = _gradients(model)

    assert two.keys() == one.keys() and "puzzle_embedding.weight" in one
    for name, grad in one.items():
        assert grad.abs().max() > 0, name  # every parameter really receives gradient
        torch.testing.assert_close(two[name], grad, rtol=0, atol=1e-5 * grad.abs().max().item(), msg=name)


def test_only_rank_zero_writes_and_checkpoints_keep_every_ranks_slots(runs):
    dirs, proc = runs
    run_dir = dirs["ddp"]
    assert proc.stdout.count("[athena] run folder:") == 1  # rank 0 alone prints the summary
    assert [r["step"] for r in train_rows(run_dir)] == [5, 10, 15, 20]  # one writer
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["last.pt", "step_10.pt", "step_20.pt"]
    state = load(run_dir)
    assert state["world_size"] == 2 and len(state["rank_rng"]) == 2
    assert len(state["task"]) == 2  # [rank]["carries"][micro-batch]
    assert all(len(t["carries"]) == 1 and t["carries"][0]["z_H"].shape[0] == 16 for t in state["task"])


def test_resume_with_two_processes_equals_uninterrupted(runs, tmp_path, data_root):
    dirs, _ = runs
    torchrun(*COMMON, f"hydra.run.dir={tmp_path}", f"resume={dirs['ddp']}/checkpoints/step_10.pt",
             data_root=data_root)
    assert_resumed(tmp_path, f"{dirs['ddp']}/checkpoints/step_10.pt", step=10, first_logged=15)
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
    assert state["step"] == 20 and state["world_size"] == 1 and len(state["task"]["carries"]) == 1


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
        assert torch.equal(ddp["model"][name], tensor), name
        base_name = name.replace(".base_layer.", ".")
        if base_name in frozen:  # frozen base: bit-identical to the pretrained weights on every rank
            assert torch.equal(ddp["model"][name], frozen[base_name]), name
    for a, b in zip(train_rows(tmp_path / "ddp"), train_rows(tmp_path / "accum2"), strict=True):
        assert a["train/router_loss"] == b["train/router_loss"], a["step"]


def test_a_rank_error_ends_the_launch_in_one_line(tmp_path, data_root):
    """A user error on the ranks: `python -m athena.launch` (torchrun's arguments) ends with the ranks' one line;
    plain torchrun ends with its own failure table, whose traceback field carries that line instead of a traceback."""
    bad = (*COMMON, "train.global_batch_size=30", "train.grad_accum_steps=2", f"hydra.run.dir={tmp_path}")
    expected = "error: train.global_batch_size 30 must be divisible by world_size 2 x train.grad_accum_steps 2"
    proc = torchrun(*bad, data_root=data_root, check=False, launcher="athena.launch")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == expected, proc.stderr[-2000:]
    proc = torchrun(*bad, data_root=data_root, check=False)
    assert proc.returncode != 0 and f"traceback : {expected}" in proc.stderr


# ----------------------------------------------------------------- train.parallel=fsdp (FSDP2, fully_shard)
# The same smoke run with the dense weights, gradients, optimizer and EMA state sharded over the 2 processes. FSDP
# reduce-scatters (sums) the gradients, which here is exactly the one-process accumulation, and every other update is
# elementwise, so the runs agree bit for bit. The gradient norm is the one sum taken over shards: in float64
# (distributed.clip_grad_norm), so the clip factor is the same float32 number whole or sharded (a float32 norm
# differed in its last bits, which clipping spread through the weights and a flipped halt then amplified). The
# clipped path is checked by the cross-mode resume below; these runs leave clipping off (the norm is still logged).
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
                assert torch.equal(fsdp[part][name], tensor), f"{step} {part}.{name}"
        for mine, theirs in zip(fsdp["optimizers"], accum["optimizers"], strict=True):
            assert mine["param_groups"] == theirs["param_groups"] and mine["state"].keys() == theirs["state"].keys()
            for i, state in theirs["state"].items():
                for key, value in state.items():
                    if torch.is_tensor(value):
                        assert torch.equal(mine["state"][i][key], value), f"{i}.{key}"
                    else:
                        assert mine["state"][i][key] == value
    for a, b in zip(train_rows(run_dir), train_rows(dirs["fsdp_accum2"]), strict=True):
        for key in ("train/loss", "train/lm_loss", "train/accuracy", "train/halted_per_step"):
            assert a[key] == b[key], (a["step"], key)
        # The norm is summed in float64 over shards in another order than over whole tensors: ~1e-16 relative.
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-12), a["step"]
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
    assert_resumed(tmp_path, f"{run_dir}/checkpoints/step_10.pt", step=10, first_logged=15)
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
            # Exact: the clip factor comes from a float64 norm, the same float32 value whole or sharded (see
            # distributed.clip_grad_norm); all other arithmetic is elementwise or the same two-term sums.
            assert torch.equal(fsdp[part][name], tensor), f"{part}.{name}"


def test_fsdp_with_compile_is_one_line_before_any_work():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["train.parallel=fsdp", "train.compile=true"])
    with pytest.raises(ConfigError, match="train.compile=true is not supported with train.parallel=fsdp yet"):
        validate_config(OmegaConf.to_container(cfg, resolve=True))


# ----------------------------------------------------------------- language models (experiment=lm_smoke)
LM = ("experiment=lm_smoke", "train.steps=10", "train.eval_every=null", "train.checkpoint_every=null")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_lm_under_two_processes_equals_one_process_with_the_same_micro_batches(parallel, tmp_path, data_root):
    """A causal LM under torchrun: rank r takes rows [8r, 8r+8) of each global batch of 16, as micro-batch r does in
    one process with 2 accumulation steps; the loss of both divides by the labelled tokens of the whole global
    batch (one count all-reduce), so the updates agree bit for bit, replicated (ddp) or sharded over the decoder
    layers (FSDP2)."""
    run_script("pretrain.py", *LM, "train.grad_accum_steps=2", f"hydra.run.dir={tmp_path / 'one'}",
               data_root=data_root)
    torchrun(*LM, f"train.parallel={parallel}", f"hydra.run.dir={tmp_path / 'two'}", data_root=data_root)
    one, two = load(tmp_path / "one"), load(tmp_path / "two")
    assert one["model"].keys() == two["model"].keys()
    for name, tensor in one["model"].items():
        assert torch.equal(two["model"][name], tensor), name
    if parallel == "fsdp":
        assert "FSDP2: dense weights, gradients and optimizer state sharded over 2 processes" in \
            (tmp_path / "two" / "pretrain.log").read_text()
