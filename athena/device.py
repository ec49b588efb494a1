"""Where a model runs and in which precision: one place for both, used by training and evaluation alike."""

from __future__ import annotations

import gc
from contextlib import nullcontext
from functools import partial
from typing import Callable

import torch

from athena.errors import AthenaError


def pick_device(name: str, local_rank: int | None = None) -> torch.device:
    """The config's device (`auto`, `cpu`, `cuda`, `cuda:N`). Under torchrun (local_rank given) `auto`/`cuda` mean
    cuda:LOCAL_RANK: one GPU per process."""
    cuda = torch.cuda.is_available()
    if name.startswith("cuda") and not cuda:
        raise AthenaError(f"device={name} asked for, but no CUDA GPU is visible; use device=cpu or device=auto")
    if local_rank is None:
        return torch.device("cuda" if cuda else "cpu") if name == "auto" else torch.device(name)
    if name == "cpu" or (name == "auto" and not cuda):
        return torch.device("cpu")
    if name in ("auto", "cuda"):
        if local_rank >= torch.cuda.device_count():
            raise AthenaError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                              "start at most one process per GPU (torchrun --nproc_per_node)")
        return torch.device("cuda", local_rank)
    raise AthenaError(f"device={name} pins every process to one GPU; with torchrun use device=auto or device=cuda "
                      "(each process takes cuda:LOCAL_RANK)")


def autocast_for(device: torch.device, precision: str) -> tuple[str, Callable]:
    """(resolved precision, a factory of the context to run forwards in): `auto` is bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return precision, partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    return precision, nullcontext


def start_clean(device: torch.device) -> None:
    """Before a run: free what earlier runs in this process left (a multirun trains its jobs one after another, and a
    finished run lives on in reference cycles until a gc pass) and restart the peak-memory count, so the run's memory
    and its logged peak are its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
