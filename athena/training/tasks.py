"""Training tasks: what one training step computes from a batch, and the per-step state that carries over.

The loop (athena.training.recipe) knows a task only through this interface, chosen by config (`task=`):

    task.setup(model, micro_batches, device)           # fresh per-step state
    loss, sums = task.step(forward, micro, batch)      # per micro-batch; loss is what backward() takes
    logged = task.summarise(window, n_steps)           # window sums of its metric keys -> logged values
    task.state_dict() / task.load_state_dict(state)    # per-process state in checkpoints

`loss` is normalised for the global batch (its gradients summed over micro-batches and processes give the global
batch's gradient); `sums` are device-side sums (no host sync) that the loop accumulates and all-reduces. Keys
`summarise` does not consume are logged by the loop as means per step.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from athena.models.trm.carry import SupervisionCarry, carry_from_state, carry_to_state

log = logging.getLogger("athena")


class TrainingTask:
    """Base class: override what the task needs. `global_batch_size` is set by the loop before setup()."""

    global_batch_size: int = 1

    def setup(self, model: torch.nn.Module, micro_batches: int, device: torch.device) -> None:
        self.model, self.device = model, device

    def step(self, forward: Callable, micro: int, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def summarise(self, window: dict[str, float], n_steps: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class TRMTask(TrainingTask):
    """TRM deep supervision: each micro-batch has its own carry of puzzle slots (SupervisionCarry) that lives across
    optimizer steps; a slot takes a new puzzle from the batch only when it halted. The model's loss is a SUM over
    the micro-batch's samples, divided here by the global batch size."""

    # Metric sums of the model (athena.models.trm.losses) that are means over the slots that halted ("count").
    PER_HALTED_SLOT = ("lm_loss", "q_halt_loss", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps")

    def setup(self, model: torch.nn.Module, micro_batches: int, device: torch.device) -> None:
        super().setup(model, micro_batches, device)
        self.carries: list[SupervisionCarry | None] = [None] * micro_batches

    def step(self, forward, micro, batch):
        carry = self.carries[micro] or self.model.initial_carry(batch)
        self.carries[micro], out = forward(carry, batch)
        del carry  # the old carry is dead: backward runs without it (the official's step does the same)
        sums = {key: value.detach().double() for key, value in out.metrics.items()}
        sums["loss"] = out.loss.detach().double()
        return out.loss / self.global_batch_size, sums

    def summarise(self, window, n_steps):
        count = max(1.0, window.get("count", 0.0))
        out = {f"train/{k}": window.pop(k) / count for k in self.PER_HALTED_SLOT if k in window}
        out["train/loss"] = window.pop("loss") / (n_steps * self.global_batch_size)
        out["train/halted_per_step"] = window.pop("count", 0.0) / n_steps
        return out

    def state_dict(self):
        return {"carries": [carry_to_state(carry) for carry in self.carries]}

    def load_state_dict(self, state):
        carries = [carry_from_state(c, self.device) for c in state.get("carries") or []]
        if len(carries) == len(self.carries):
            self.carries = carries
        else:
            log.warning("the checkpoint holds %d carries, this run has %d gradient-accumulation micro-batches: "
                        "puzzle slots restart from fresh carries", len(carries), len(self.carries))
