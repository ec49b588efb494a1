"""Components a researcher would write in their own module and plug into a run by config alone: a model
transform, a callback, a training task and an evaluator. tests/training/test_seams.py runs pretrain.py with them; nothing
in athena/ knows they exist."""

from __future__ import annotations

import torch
from torch import nn

from athena.eval.evaluators import EvalContext, Evaluator
from athena.training.callbacks import Callback
from athena.training.tasks import TRMTask


class OutputBias(nn.Module):
    """Wraps a linear head and adds a learned bias to its output (starts at zero: the model is unchanged)."""

    def __init__(self, head: nn.Module, width: int):
        super().__init__()
        self.head = head
        self.plugin_bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) + self.plugin_bias


def add_output_bias(model: nn.Module, cfg) -> nn.Module:
    """Model transform: a learned bias on the TRM's token head."""
    model.lm_head = OutputBias(model.lm_head, model.vocab_size)
    return model


class FreezeModuleAt(Callback):
    """Freezes one module's parameters after a given step (what progressive freezing will do), adds a small L2
    penalty on the halting head as an aux loss, and counts the steps it saw (saved in checkpoints)."""

    name = "freeze_plugin"

    def __init__(self, module: str, step: int, l2: float = 1e-3):
        self.module, self.at, self.l2, self.steps_seen = module, step, l2, 0

    def on_setup(self, trainer) -> None:
        self.trainer = trainer

    def aux_losses(self, model, fraction):
        return {"plugin_l2": self.l2 * fraction * model.q_head.weight.square().sum()}

    def on_step_end(self, trainer, step):
        self.steps_seen += 1
        if step == self.at:
            self._freeze()

    def _freeze(self) -> None:
        self.trainer.set_trainable(list(self.trainer.model.get_submodule(self.module).parameters()), False)

    def on_log(self, step, metrics):
        return {"plugin/steps_seen": float(self.steps_seen)}

    def state_dict(self):
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state):
        self.steps_seen = state.get("steps_seen", 0)
        if self.steps_seen >= self.at:  # a resumed run freezes what the run had frozen
            self._freeze()


class CountingTask(TRMTask):
    """TRM's task that also reports how many labelled cells it trained on (a metric the loop has never heard of)
    and keeps the count in its checkpointed state."""

    def setup(self, model, micro_batches, device):
        super().setup(model, micro_batches, device)
        self.cells = 0

    def step(self, forward, micro, batch):
        loss, sums = super().step(forward, micro, batch)
        labelled = (batch["labels"] != -100).sum()
        self.cells += int(labelled)
        sums["labelled_cells"] = labelled.double()
        return loss, sums

    def state_dict(self):
        return {**super().state_dict(), "cells": self.cells}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.cells = state["cells"]


class BlankCellReport:
    def __init__(self, blanks: int, sequences: int):
        self.blanks, self.sequences = blanks, sequences

    @property
    def score(self) -> float:
        return self.blanks / max(self.sequences, 1)

    def scope(self) -> str:
        return f"n={self.sequences}"

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {f"{prefix}blank_cells": float(self.blanks), f"{prefix}count": float(self.sequences)}

    def summary(self) -> dict:
        return {"blank_cells": self.blanks, "count": self.sequences}

    def headline(self) -> str:
        return f"{self.blanks} blank cells"

    def plots(self, folder, title, stem="unused"):
        return {}


class BlankCellEvaluator(Evaluator):
    """Scores nothing a model does: counts the test split's blank (labelled) cells, so a test can check the
    number against the data directly."""

    def evaluate(self, ctx: EvalContext) -> BlankCellReport:
        blanks = sequences = 0
        for batch in ctx.loader:
            blanks += int((batch["labels"] != -100).sum())
            sequences += batch["labels"].shape[0]
        return BlankCellReport(blanks, sequences)
