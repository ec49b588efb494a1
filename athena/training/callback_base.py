"""The base class of training callbacks: every hook a no-op. The order the loop calls them in, and what each may do,
is documented in athena.training.callbacks (which re-exports `Callback`; the config-switched callbacks are listed
there). The base lives apart so that a callback in its own module (athena.training.freezing, ...) can subclass it
while callbacks.py imports that module for its registry, without an import cycle."""

from __future__ import annotations

from typing import Any

import torch


class Callback:
    name: str = ""  # the key of its state in checkpoints; defaults to the class name

    def on_setup(self, trainer) -> None:
        pass

    def on_batch(self, trainer, step: int, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch

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
