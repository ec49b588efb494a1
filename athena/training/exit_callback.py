"""exit=hierarchical in a run: the routers' and gates' losses join the loss, and what they decided is logged."""

from __future__ import annotations

from typing import TYPE_CHECKING

from athena.adaptive.wrapper import HierarchicalAdaptiveWrapper
from athena.training.callback_base import Callback

if TYPE_CHECKING:
    import torch

    from athena.config import RunConfig


class ExitCallback(Callback):
    """exit=hierarchical: the routers' z-loss and entropy and the gates' depth cost join the loss; logged at each log
    step, over the training forwards since the last: exit/share_<layer> (tokens leaving after that layer; `end`: the
    ones that ran every layer), exit/capacity_<i> (realised FFN share of layer i), exit/router_load_<i> (mean router
    probability), exit/router_z_loss, exit/mean_depth (share of layers a token ran)."""

    name = "exit"

    def __init__(self):
        self.window: dict[str, float | torch.Tensor] = {}
        self.forwards = 0

    def aux_losses(self, model, fraction):
        wrapper = getattr(model, "module", model)  # under DDP
        if not isinstance(wrapper, HierarchicalAdaptiveWrapper):
            return {}
        self._accumulate(wrapper)
        return {name: value.float() * fraction for name, value in wrapper.aux_losses().items()}

    def _accumulate(self, wrapper):
        stats = wrapper.last_stats
        if stats is None or not stats.tokens:
            return
        add = self.window
        depth = len(wrapper.parts.layers)
        layers = [layer for layer in wrapper.exit_layers][: len(stats.exits)]
        for layer, count in zip(layers, stats.exits):
            add[f"exit/share_{layer}"] = add.get(f"exit/share_{layer}", 0.0) + count / stats.tokens
        ran_all = stats.tokens - sum(stats.exits)
        add["exit/share_end"] = add.get("exit/share_end", 0.0) + ran_all / stats.tokens
        mean_depth = (sum(l * c for l, c in zip(layers, stats.exits)) + depth * ran_all) / (depth * stats.tokens)
        add["exit/mean_depth"] = add.get("exit/mean_depth", 0.0) + mean_depth
        for i, share in enumerate(stats.realised_capacity):
            add[f"exit/capacity_{i}"] = add.get(f"exit/capacity_{i}", 0.0) + share
        # Router loads and z-losses stay device tensors until the log step: a float() here would wait for the GPU
        # once per layer and micro-batch.
        for i, load in enumerate(stats.router_load):
            add[f"exit/router_load_{i}"] = add.get(f"exit/router_load_{i}", 0.0) + load
        if stats.z_loss:
            add["exit/router_z_loss"] = add.get("exit/router_z_loss", 0.0) + sum(stats.z_loss) / len(stats.z_loss)
        self.forwards += 1

    def on_log(self, step, metrics):
        out = {key: float(value) / max(self.forwards, 1) for key, value in self.window.items()}
        self.window, self.forwards = {}, 0
        return out


def exit_callback(cfg: RunConfig) -> Callback | None:
    return ExitCallback() if cfg.exit.name != "none" else None

