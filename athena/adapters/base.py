"""AdapterLayer: what every adapter wrapper has, and the model-wide functions written against it.

A wrapper holds one base layer (`base_layer`, as peft names it) and adds trainable parts around it. Code that
works on a whole model (freezing, merging, unloading, saving, quantising, the auxiliary loss, counting) asks each
wrapper through this interface and never checks which kind of wrapper it is, so a new kind of adapter needs no
edit there. PolyAdapter (poly.py) and BottleneckWrapper (bottleneck.py) are the two kinds today.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import torch
from torch import nn

from athena.adapters.linear import Int8Linear


class DeferredLoss(NamedTuple):
    """What a layer recorded in its grad-enabled forwards for an auxiliary loss that is computed later, for all
    layers at once: adapter_aux_loss computes `loss(calls, *weights)` once per (loss, weights) group."""

    loss: Callable[..., torch.Tensor | None]
    weights: tuple
    calls: list


class AdapterLayer(nn.Module):
    """One wrapped base layer plus adapter parts. Subclasses build their parts, then call follow_base_layer_mode."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer

    def follow_base_layer_mode(self) -> None:
        """Take the wrapped layer's training mode; call it last in __init__, when every part exists. A wrapper put
        into an eval-mode model must run no dropout."""
        self.train(self.base_layer.training)

    # The base layer's weight and bias, as peft exposes them: parents may read them (T5's FFN casts its input to
    # `wo.weight.dtype` before calling wo).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def part_names(self) -> tuple[str, ...]:
        """Names of the parts this layer was built with ("lora", "ia3", "experts", "bottleneck")."""
        return ()

    def adapter_modules(self) -> Iterator[nn.Module]:
        """The submodules that belong to the adapter, not to the wrapped base layer."""
        for name, module in self.named_modules():
            if name and name != "base_layer" and not name.startswith("base_layer."):
                yield module

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("base_layer.")]

    # ---- merging: folding parts into the base weight (a no-op for parts that depend on the input) ----
    @property
    def merged(self) -> bool:
        return False

    def merge(self) -> None:
        pass

    def unmerge(self) -> None:
        pass

    def unmergeable(self) -> tuple[str, nn.Module] | None:
        """(kind, object) of what merge cannot fold into the base weight ("experts" / "bottlenecks"), or None."""
        return None

    def unloaded(self) -> nn.Module:
        """What merge_and_unload leaves in this layer's place once merged: the base layer, or itself when it keeps
        parts that could not be merged."""
        return self

    # ---- auxiliary losses ----
    def pop_deferred_losses(self) -> list[DeferredLoss]:
        """The auxiliary-loss inputs recorded since the last pop (forgotten once popped)."""
        return []


# ---- model-wide ----

def adapter_layers(model: nn.Module) -> list[AdapterLayer]:
    return [m for m in model.modules() if isinstance(m, AdapterLayer)]


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, AdapterLayer) for m in model.modules())


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter parameter once (shared bottlenecks counted once), in the model's parameter order."""
    ids = {id(p) for layer in adapter_layers(model) for p in layer.adapter_parameters()}
    return [p for p in model.parameters() if id(p) in ids]


def adapter_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the auxiliary (router) losses of every adapter layer's grad-enabled forwards since the last call;
    resets them.

    All layers' recorded calls are gathered first and computed together (experts.router_loss), a handful of
    kernels per step instead of ~10 per layer per call. None when no layer recorded anything since the last call.
    """
    groups: dict[tuple, list] = {}
    for layer in adapter_layers(model):
        for deferred in layer.pop_deferred_losses():
            groups.setdefault((deferred.loss, deferred.weights), []).extend(deferred.calls)
    total = None
    for (loss, weights), calls in groups.items():
        term = loss(calls, *weights)
        if term is not None:
            total = term if total is None else total + term.to(total.device)
    return total


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each tensor once; int8-quantised base weights count in total."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.weight.numel() + (0 if m.bias is None else m.bias.numel())
                 for m in model.modules() if isinstance(m, Int8Linear))
    return trainable, total
