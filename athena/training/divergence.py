"""Stop a run whose loss, gradients, weights or EMA stop being finite, before a bad checkpoint is written, naming
the newest checkpoint it can continue from."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from athena.checkpoint import point_last_at, step_files
from athena.errors import AthenaError
from athena.training import distributed


class TrainingDiverged(AthenaError, RuntimeError):
    """Loss, gradient norm, weights or EMA stopped being finite."""


class DivergenceGuard:
    """Tracks `finite_through`: the loss of every step up to it was seen finite. A checkpoint of step s is one a run
    can continue from when the loss of step s + 1, computed from its weights, was seen finite (s < finite_through);
    a later checkpoint can hold finite weights that already give a NaN loss."""

    def __init__(self, checkpoint_dir: Path, is_main: bool, device: torch.device, finite_through: int = 0):
        self.checkpoint_dir, self.is_main, self.device = checkpoint_dir, is_main, device
        self.finite_through = finite_through

    def check_metrics(self, metrics: dict[str, float], step: int) -> None:
        """At a log step: the window's loss and gradient norm (already all-reduced)."""
        bad = [k for k in ("train/loss", "train/grad_norm") if not math.isfinite(metrics[k])]
        if bad:
            self.diverged(f"{bad[0]} became {metrics[bad[0]]}", step)
        self.finite_through = step

    def check_state(self, tensors: list[torch.Tensor], step: int) -> None:
        """Before a save: weights, EMA and the loss summed since the last check, on every rank (one flag reduced)."""
        local = [distributed.local_tensor(t) for t in tensors]
        finite = torch.stack([torch.isfinite(t).all() for t in local if t.numel()]).all().item()
        if distributed.any_rank(not finite, self.device):
            self.diverged("the weights, EMA or loss stopped being finite", step)
        self.finite_through = step

    def diverged(self, what: str, step: int) -> None:
        """Stop, naming the newest good checkpoint and pointing last.pt at it, so resume=auto continues there."""
        where = "no checkpoint was written yet"
        if self.is_main and self.checkpoint_dir.is_dir():
            good = [path for s, path in step_files(self.checkpoint_dir) if s < self.finite_through]
            if good:
                point_last_at(good[-1])
                where = f"last good checkpoint: {good[-1]}, which last.pt now points to"
            elif step_files(self.checkpoint_dir):
                where = f"no checkpoint from before step {self.finite_through} is kept"
        raise TrainingDiverged(f"{what} by step {step} ({where}); lower train.lr, keep train.grad_clip set, "
                               "or try train.precision=fp32")
