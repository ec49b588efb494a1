"""memory=amrpa in a run: AMRPA's regularisers join the loss, and its gate and selection metrics are logged."""

from __future__ import annotations

from typing import TYPE_CHECKING

from athena.memory.amrpa import amrpa_aux_loss, get_amrpa_metrics
from athena.training.callback_base import Callback

if TYPE_CHECKING:
    from athena.config import RunConfig


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
    # TRM's arch.amrpa_window (memory across the recursion) adds its regularisers to the model's loss itself (none is
    # pending here then); the callback logs its metrics.
    recursion = getattr(cfg.arch_config, "amrpa_window", 0)
    return AMRPACallback() if cfg.memory.name != "none" or recursion else None
