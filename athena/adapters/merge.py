"""Fold adapters into the base weights and back, and unload them: merge_adapters, unmerge_adapters,
merge_and_unload. Each wrapper says what it can merge (AdapterLayer.merge) and what it leaves in its place."""

from __future__ import annotations

import warnings

from torch import nn

from athena.adapters.base import AdapterLayer, adapter_layers, has_adapters
from athena.adapters.inject import set_module


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold LoRA and IA3 into the base weights of every adapter layer (outputs unchanged)."""
    for layer in adapter_layers(model):
        layer.merge()
    _warn_unmergeable(model, "merge_adapters")
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    for layer in adapter_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then replace each adapter layer by its plain base layer.

    Layers with experts and bottleneck wrappers cannot be merged: they are kept (merged for their LoRA/IA3)
    and a warning says so plainly.
    """
    merge_adapters(model)
    names = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    for name in names:
        layer = model.get_submodule(name)
        replacement = layer.unloaded()
        if replacement is not layer:
            set_module(model, name, replacement)
    if not has_adapters(model) and hasattr(model, "adapter_config"):
        del model.adapter_config
    return model


def _warn_unmergeable(model: nn.Module, what: str) -> None:
    kept: dict[str, set[int]] = {"experts": set(), "bottlenecks": set()}
    for layer in adapter_layers(model):
        unmergeable = layer.unmergeable()
        if unmergeable is not None:
            kind, part = unmergeable
            kept.setdefault(kind, set()).add(id(part))  # a shared bottleneck counts once
    experts, bottlenecks = len(kept["experts"]), len(kept["bottlenecks"])
    if experts or bottlenecks:
        warnings.warn(
            f"{what}: LoRA and IA3 are merged into the base weights, but {experts} layer(s) keep their routed "
            f"experts and {bottlenecks} bottleneck adapter(s) stay unmerged (they depend on the input, so they "
            f"cannot be folded into a weight); those still run as modules", stacklevel=3)
