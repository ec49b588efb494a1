"""Training tasks: what one training step computes from a batch, and the per-step state that carries over.

The loop (athena.training.recipe) knows a task only through this interface, chosen by config (`task=`):

    task.setup(model, micro_batches, device)           # fresh per-step state
    task.begin_step(batch)                             # this process's whole batch, before its micro-batches
    loss, sums = task.step(forward, micro, batch)      # per micro-batch; loss is what backward() takes
    logged = task.summarise(window, n_steps, seconds)  # window sums of its metric keys -> logged values
    task.state_dict() / task.load_state_dict(state)    # per-process state in checkpoints

`loss` is normalised for the global batch (its gradients summed over micro-batches and processes give the global
batch's gradient); `sums` are device-side sums (no host sync) that the loop accumulates and all-reduces. Keys
`summarise` does not consume are logged by the loop as means per step.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from athena.models.trm.carry import SupervisionCarry, carry_from_state, carry_to_state
from athena.training import distributed

IGNORE_INDEX = -100

log = logging.getLogger("athena")


class TrainingTask:
    """Base class: override what the task needs. `global_batch_size` is set by the loop before setup()."""

    global_batch_size: int = 1

    def setup(self, model: torch.nn.Module, micro_batches: int, device: torch.device) -> None:
        self.model, self.device = model, device

    def begin_step(self, batch: dict[str, torch.Tensor]) -> None:
        pass

    def step(self, forward: Callable, micro: int, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def summarise(self, window: dict[str, float], n_steps: int, seconds: float) -> dict[str, float]:
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

    def summarise(self, window, n_steps, seconds):
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


class CausalLMTask(TrainingTask):
    """Next-token prediction for a causal language model (a Hugging Face model, called as
    `model(input_ids=inputs).logits`): position t predicts labels[t + 1]. A packed split labels every token; a
    supervised fine-tuning split labels the answer only (-100 elsewhere), so the same task trains both.

    The loss is the mean over the labelled tokens of the GLOBAL batch: each micro-batch's token-loss sum divided by
    the number of labelled tokens in all micro-batches of all processes (one all-reduce of a count per step), so
    every token weighs the same however the batch is split and however many answer tokens each sample has."""

    def begin_step(self, batch):
        count = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().double()
        self.global_tokens = distributed.all_reduce_sum(count).clamp_min(1.0)

    def step(self, forward, micro, batch):
        logits = forward(input_ids=batch["inputs"]).logits[:, :-1]  # (B, L - 1, vocab)
        labels = batch["labels"][:, 1:]
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        labelled = labels != IGNORE_INDEX
        sums = {"loss": loss_sum.detach().double(), "tokens": labelled.sum().double(),
                "correct": ((logits.argmax(-1) == labels) & labelled).sum().double()}
        return loss_sum / self.global_tokens.to(loss_sum.dtype), sums

    def summarise(self, window, n_steps, seconds):
        tokens = max(window.pop("tokens", 0.0), 1.0)
        loss = window.pop("loss") / tokens
        return {"train/loss": loss, "train/perplexity": math.exp(min(loss, 50.0)),
                "train/token_accuracy": window.pop("correct") / tokens, "train/tokens_per_s": tokens / max(seconds, 1e-9)}
