"""The state of a training run in a checkpoint: what it holds, writing it, and continuing from it.

Functions of the running PretrainRecipe (`run`): state_dict(run), save(run, window), resume(run). The file format
itself (atomic writes, safe loading, weights) is athena.checkpoint's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from athena.checkpoint import (
    CheckpointError, check_weights_fit, find_resume_checkpoint, load_checkpoint, resolve_checkpoint_path, rng_state,
    save_checkpoint, set_rng_state,
)
from athena.models.build import check_adapter_has_base, differing_keys
from athena.training import distributed
from athena.training.ema import ModelEMA

log = logging.getLogger("athena")

# Config sections that must match for a checkpoint to continue this run.
MUST_MATCH = ("arch", "data", "adapter")


def state_dict(run) -> dict[str, Any]:
    """The checkpoint. Weights, EMA and optimizer state are identical on every rank; the task's state (TRM's
    puzzle slots) and RNG streams are per rank. One process: `task` is its task state and `rng` its RNG state.
    Under torchrun (call on EVERY rank, the result is for rank 0): `task` and `rank_rng` hold every rank's,
    indexed by rank, and `rng` is rank 0's, so a resume with the same world size continues exactly; any other
    world size restarts the task's state (see resume)."""
    state = {
        "model": distributed.model_state(run.model),  # full tensors, also under FSDP (rank 0 holds them)
        "ema": run.ema.state_dict() if run.ema else None,
        "optimizers": [distributed.optimizer_state(opt) for opt in run.optimizers],
        "step": run.step,
        "batches_consumed": run.batches_consumed,
        "task": run.task.state_dict(),
        "callbacks": {cb.key: cb.state_dict() for cb in run.callbacks},
        "rng": rng_state(),
        "config": run.config_dict,
        "wandb_run_id": run.wandb_run_id,
        "world_size": run.dist.world_size,
    }
    if run.dist.enabled:
        gathered = distributed.gather_objects({"task": to_cpu(state["task"]), "rng": state["rng"]})
        if gathered is not None:
            state["task"] = [g["task"] for g in gathered]
            state["rank_rng"] = [g["rng"] for g in gathered]
    return state


def save(run, window: dict[str, torch.Tensor] | None = None) -> Path:
    """Rank 0 writes; the other ranks wait for it at a barrier (so nobody reads a half-written run).

    Refuses (TrainingDiverged) to write weights, EMA or a loss since the last check (`window`) that are not
    finite: every checkpoint on disk is one a run can continue from."""
    tensors = [p.detach() for p in run.model.parameters()]
    tensors += list(run.ema.shadow.values()) if run.ema else []
    tensors += [torch.as_tensor(window["loss"])] if window and "loss" in window else []
    run.guard.check_state(tensors, run.step)
    state = run.state_dict()  # every rank: it gathers the per-rank task states
    path = run.checkpoint_dir / f"step_{run.step}.pt"
    if run.is_main:
        path = save_checkpoint(state, run.checkpoint_dir, run.step, run.cfg.train.keep_checkpoints)
        log.info("saved checkpoint %s", path)
    distributed.barrier()
    run.saved_step = run.step
    return path


def resume(run) -> None:
    """resume=auto (this folder's newest readable checkpoint, if any), a file or a run folder: load everything the
    checkpoint holds into the set-up run; a bare state dict loads as weights only."""
    source = run.cfg.resume
    if source == "none":
        return
    if source == "auto":
        path = find_resume_checkpoint(run.checkpoint_dir)
        if path is None:
            check_adapter_has_base(run.cfg, resuming=False)
            log.info("resume=auto: no checkpoint in %s, starting fresh", run.checkpoint_dir)
            return
    else:
        path = resolve_checkpoint_path(source)  # a file, or a run folder's newest checkpoint
    state = load_checkpoint(path)
    if state["format"] == "weights-only":
        check_weights_fit(run.model, state["model"], f"resume={path} (a bare state dict)")
        distributed.load_model_state(run.model, state["model"])
        if run.ema:  # the EMA starts from the loaded weights, not from the random initialisation
            run.ema = ModelEMA(run.ema_params(), run.cfg.train.ema_decay)
        log.warning("%s holds weights only: optimizer, EMA and data position start fresh", path)
        return
    check_config_matches(run, state.get("config") or {}, path)
    check_weights_fit(run.model, state["model"], f"resume={path}")
    distributed.load_model_state(run.model, state["model"])  # full state in, each rank's shard under FSDP
    if run.ema and state.get("ema"):
        run.ema.load_state_dict(state["ema"])
    for opt, opt_state in zip(run.optimizers, state["optimizers"], strict=True):
        distributed.load_optimizer_state(opt, opt_state)
    for callback in run.callbacks:
        callback.load_state_dict((state.get("callbacks") or {}).get(callback.key, {}))
    run.step = run.guard.finite_through = state["step"]
    if Path(path).resolve().parent == run.checkpoint_dir.resolve():
        run.saved_step = run.step  # continuing in the folder that holds this state already
    run.batches_consumed = state["batches_consumed"]
    run.wandb_run_id = state.get("wandb_run_id")
    saved_world, world, rank = state.get("world_size", 1), run.dist.world_size, run.dist.rank
    if saved_world != world:
        # The task's state is per rank (TRM: puzzle slots): it cannot be re-split for another world size. The
        # data position, weights and optimizer state carry over; only the in-flight puzzles restart.
        log.warning("%s was written by %d process(es), this run has %d: puzzle slots restart from fresh "
                    "carries", path, saved_world, world)
        if rank == 0:
            set_rng_state(state["rng"])
        # Other ranks keep their seed + rank stream (set in setup).
    else:
        task_state = state.get("task") or {}
        run.task.load_state_dict(task_state if world == 1 else task_state[rank])
        set_rng_state(state["rank_rng"][rank] if world > 1 else state["rng"])
    log.info("resumed from %s at step %d", path, run.step)


def check_config_matches(run, saved: dict[str, Any], path: Path) -> None:
    differing = differing_keys(saved, run.config_dict, MUST_MATCH)
    if differing:
        raise CheckpointError(
            f"checkpoint {path} was trained with a different config ({', '.join(differing[:6])}); "
            "resume with the same arch/data/adapter, or use init_from= to start a new run from its weights"
        )


def to_cpu(value: Any) -> Any:
    """`value` with every tensor (in nested dicts and lists) moved to the CPU, for gathering between processes."""
    if torch.is_tensor(value):
        return value.cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value
