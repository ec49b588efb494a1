"""Callbacks: behaviour added to the training loop without editing it (router losses, freezing, rehearsal, ...).

The loop calls, in this order:

    on_setup(trainer)                  after model, optimisers, EMA and task exist (before a resume loads state)
    aux_losses(model, fraction)        per micro-batch after the task's forward: {name: loss}, added to the loss
    on_after_backward(trainer, step)   gradients summed over processes, before clipping and the optimizer step
    on_step_end(trainer, step)         after the optimizer step and the EMA update
    on_log(step, metrics) -> dict      at log steps: extra metrics to log beside the loop's
    on_eval(step, metrics)             after each evaluation
    on_finish(trainer)                 after the final evaluation (rank 0 writes files)
    state_dict() / load_state_dict()   saved in every checkpoint under the callback's `name`

`fraction` is the micro-batch's share of the global batch: an aux loss that is a mean over the micro-batch's
tokens times `fraction`, summed over micro-batches and processes, is the mean over the global batch. Each aux loss
is also logged as train/<name> (its value per step). A callback that changes which parameters train calls
trainer.set_trainable(params, flag): the optimisers skip parameters without gradients, gradient sync and the EMA
follow requires_grad, and frozen parameters build no autograd graph. Which parameters train is not in the
checkpoint: such a callback sets it again from its own state in load_state_dict (called on resume after on_setup).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable

import torch

from athena.adapters import adapter_aux_loss, save_adapter
from athena.memory.amrpa import amrpa_aux_loss, get_amrpa_metrics

if TYPE_CHECKING:
    from athena.config import RunConfig


class Callback:
    name: str = ""  # the key of its state in checkpoints; defaults to the class name

    def on_setup(self, trainer) -> None:
        pass

    def aux_losses(self, model: torch.nn.Module, fraction: float) -> dict[str, torch.Tensor]:
        return {}

    def on_after_backward(self, trainer, step: int) -> None:
        pass

    def on_step_end(self, trainer, step: int) -> None:
        pass

    def on_log(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        return {}

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_finish(self, trainer) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    @property
    def key(self) -> str:
        return self.name or type(self).__name__


class AdapterCallback(Callback):
    """adapter=<method>: the routers' load-balancing and z losses join the loss, and the trained adapter is saved
    (with the weights just evaluated: the EMA when on) to <run dir>/adapter in peft's format where it fits."""

    name = "adapter"

    def aux_losses(self, model, fraction):
        router = adapter_aux_loss(model)  # grad-enabled router calls since the last call (this micro-batch)
        return {} if router is None else {"router_loss": router.float() * fraction}

    def on_finish(self, trainer):
        if not trainer.is_main:
            return
        with trainer.ema.applied() if trainer.ema else nullcontext():
            save_adapter(trainer.model, trainer.run_dir / "adapter")


def adapter_callback(cfg: RunConfig) -> Callback | None:
    return AdapterCallback() if cfg.adapter.name != "none" else None


class AMRPACallback(Callback):
    """memory=amrpa: AMRPA's regularisers (selection diversity, gate) join the loss as train/amrpa_reg, and each log
    step adds the last training forward's metrics, averaged over the targeted layers (train/amrpa_gate_impact, ...)."""

    name = "amrpa"

    def on_setup(self, trainer):
        self.model = trainer.model

    def aux_losses(self, model, fraction):
        regularisers = amrpa_aux_loss(model)  # those of this micro-batch's forward (a mean over its tokens)
        return {} if regularisers is None else {"amrpa_reg": regularisers.float() * fraction}

    def on_log(self, step, metrics):
        values = get_amrpa_metrics(self.model)
        return {f"train/amrpa_{name}": float(values[name].nanmean()) for name in
                ("gate_mean", "gate_impact", "alpha_diversity", "memory_similarity", "gate_strength")}


def amrpa_callback(cfg: RunConfig) -> Callback | None:
    return AMRPACallback() if cfg.memory.name != "none" else None


# Callbacks that config switches on (each: cfg -> callback or None); freezing and rehearsal come here next. A run's
# own callbacks (`callbacks=[...]` in config) follow them.
BUILTIN_CALLBACKS: tuple[Callable[[RunConfig], Callback | None], ...] = (adapter_callback, amrpa_callback)
