"""Callbacks: behaviour added to the training loop without editing it (router losses, freezing, rehearsal, ...).

The loop calls, in this order:

    on_setup(trainer)                  after model, optimisers, EMA and task exist (before a resume loads state)
    on_batch(trainer, step, batch)     before each step: this process's batch (CPU tensors) -> the batch to train on
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
After each step, trainer.step_sums holds this process's metric sums of that step (device tensors: the task's keys,
e.g. `loss`, and `tokens` for a causal LM).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Callable

from athena.adapters import adapter_aux_loss, save_adapter
from athena.training.callback_base import Callback
from athena.training.exit_callback import exit_callback
from athena.training.memory_callback import amrpa_callback
from athena.training.freezing import freezing_callback
from athena.training.rehearsal import rehearsal_callback

__all__ = ["BUILTIN_CALLBACKS", "AdapterCallback", "Callback"]

if TYPE_CHECKING:
    from athena.config import RunConfig


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


# Callbacks that config switches on (each: cfg -> callback or None). A run's own callbacks (`callbacks=[...]` in
# config) follow them. Rehearsal comes before freezing: the loss spike freezing watches is the mixed batch's.
BUILTIN_CALLBACKS: tuple[Callable[[RunConfig], Callback | None], ...] = (adapter_callback, amrpa_callback, exit_callback,
                                                                         rehearsal_callback, freezing_callback)
