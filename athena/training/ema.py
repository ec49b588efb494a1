"""Exponential moving average of the weights; TRM evaluates and ships the EMA model."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from athena.training.distributed import full_tensor, is_dtensor, shard_like


class ModelEMA:
    """Keeps a float32 shadow of the chosen parameters: shadow = decay * shadow + (1 - decay) * param.

    The sparse puzzle embedding is left out (as in TRM): its rows move only when seen, so an
    average over steps would mostly average stale rows. Under FSDP (train.parallel=fsdp) the parameters and so the
    shadow are DTensor shards: update and applied() work shard by shard, state_dict() gathers the full tensors.
    """

    def __init__(self, named_parameters: dict[str, nn.Parameter], decay: float):
        self.decay = decay
        self.params = named_parameters
        self.shadow = {name: p.detach().float().clone() for name, p in named_parameters.items()}

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step for the parameters that train now; a frozen one (requires_grad off mid-run, see
        PretrainRecipe.set_trainable) keeps its average until it thaws."""
        names = [name for name, p in self.params.items() if p.requires_grad]
        shadow = [self.shadow[name] for name in names]
        current = [self.params[name].detach().float() for name in names]
        if shadow:
            torch._foreach_lerp_(shadow, current, 1.0 - self.decay)

    @contextmanager
    def applied(self):
        """Temporarily swap the EMA weights into the model (for evaluation and saving)."""
        backup = {name: p.detach().clone() for name, p in self.params.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors: under FSDP the shadow is sharded like the parameters and is gathered here (on the CPU;
        a collective, so every rank calls it)."""
        return {name: full_tensor(t).cpu() if is_dtensor(t) else t.clone() for name, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise KeyError(f"EMA state does not match the model: {sorted(missing)[:3]}")
        for name, t in state.items():
            self.shadow[name].copy_(shard_like(t, self.shadow[name]))
