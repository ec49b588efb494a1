"""Hybrid adaptation: LoRA on the attention projections, a bottleneck adapter after every FFN output.

    apply_lora_to  (default: the family's attention projections) -> PolyAdapter (LoRA; IA3/experts if asked)
    target_modules (default: the family's FFN output projection) -> BottleneckWrapper: out = adapter(base(x)),
                                                                    adapter(h) = h + up(act(down(h)))
With share_across_layers, all wrapped layers with the same output width reuse ONE BottleneckAdapter object
(its parameters appear, and are counted and optimised, once).
"""

from __future__ import annotations

import torch
from torch import nn

from athena.adapters.bottleneck.layer import BottleneckAdapter
from athena.adapters.config import AdapterConfig, AdapterConfigError
from athena.adapters.model import _refuse_stacking, finish, poly_adapter_for, set_module
from athena.adapters.poly.layer import base_dims
from athena.adapters.targets import select_modules


class BottleneckWrapper(nn.Module):
    """Runs the wrapped FFN output layer, then the (possibly shared) bottleneck adapter on its output."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base_layer, self.adapter = base_layer, adapter
        self.train(base_layer.training)  # no bottleneck dropout around an eval-mode layer

    # The wrapped layer's weight and bias, for parents that read them (T5's FFN reads `wo.weight.dtype`).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base_layer(x))


def add_hybrid_adapter_to_model(model: nn.Module, config: AdapterConfig) -> nn.Module:
    if isinstance(config, dict):
        config = AdapterConfig.from_dict(config)
    if config.method != "hybrid":
        raise AdapterConfigError(f"add_hybrid_adapter_to_model needs method='hybrid', got {config.method!r}; "
                                 f"use add_adapters for the other methods")
    _refuse_stacking(model)
    # Select both sets before wrapping anything, so a module can be in both (then: bottleneck(LoRA(x))).
    lora_targets = []
    if config.apply_lora_to != [] and (config.lora_on or config.ia3_on or config.moe_on):
        lora_targets = select_modules(model, config.apply_lora_to, config, "apply_lora_to", "attention")
    ffn_targets = select_modules(model, config.target_modules, config, "target_modules", "ffn_out")

    for name in lora_targets:
        set_module(model, name, poly_adapter_for(model.get_submodule(name), name, config))
    shared: dict[int, BottleneckAdapter] = {}
    for name in ffn_targets:
        module = model.get_submodule(name)
        inner = module.base_layer if hasattr(module, "base_layer") else module
        _, out_features, _ = base_dims(inner)
        w = inner.weight
        adapter = shared.get(out_features) if config.share_across_layers else None
        if adapter is None:
            adapter = BottleneckAdapter(
                out_features, config.bottleneck_size, config.bottleneck_activation, config.bottleneck_dropout,
                config.bottleneck_gating, device=w.device, dtype=w.dtype if w.is_floating_point() else None)
            shared[out_features] = adapter
        set_module(model, name, BottleneckWrapper(module, adapter))
    finish(model, config)
    return model
