"""Hybrid adaptation: LoRA on the attention projections, a bottleneck adapter after every FFN output.

    add_hybrid_adapter_to_model(model, HybridAdapterConfig(lora_rank=8, adapter_size=64))
    # is add_adapters(model, AdapterConfig(method="hybrid", rank=8, bottleneck_size=64))

HybridAdapterConfig speaks the names hybrid-adapter code usually uses (lora_rank, adapter_size, ...); each maps
onto one AdapterConfig field, and AdapterConfig validates the values and holds the defaults. The wrapping
itself is inject.add_adapters' (see inject.py for which layers each set selects).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from athena.adapters.config import AdapterConfig, AdapterConfigError
from athena.adapters.inject import add_adapters

# HybridAdapterConfig field -> AdapterConfig field.
FIELD_MAP = {
    "lora_rank": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "adapter_size": "bottleneck_size",
    "adapter_dropout": "bottleneck_dropout",
    "adapter_activation": "bottleneck_activation",
    "shared_parameters": "share_across_layers",
    "target_modules": "target_modules",
    "apply_lora_to": "apply_lora_to",
    "freeze_base": "freeze_base",
}


@dataclass
class HybridAdapterConfig:
    lora_rank: int = AdapterConfig.rank
    lora_alpha: float = AdapterConfig.alpha
    lora_dropout: float = AdapterConfig.dropout
    adapter_size: int = AdapterConfig.bottleneck_size  # width of the bottleneck
    adapter_dropout: float = AdapterConfig.bottleneck_dropout
    adapter_activation: str = AdapterConfig.bottleneck_activation
    shared_parameters: bool = AdapterConfig.share_across_layers  # one bottleneck per output width, for all layers
    target_modules: list[str] | None = AdapterConfig.target_modules  # FFN outputs; None -> the family's
    apply_lora_to: list[str] | None = AdapterConfig.apply_lora_to  # LoRA targets; None -> attention projections
    freeze_base: bool = AdapterConfig.freeze_base

    def __post_init__(self):
        self.to_adapter_config()  # a bad value fails here, as AdapterConfig's do

    def to_adapter_config(self) -> AdapterConfig:
        values = {FIELD_MAP[f.name]: getattr(self, f.name) for f in dataclasses.fields(self)}
        try:
            return AdapterConfig(method="hybrid", **values)
        except AdapterConfigError as error:
            own = {adapter_field: name for name, adapter_field in FIELD_MAP.items()}
            field = own.get(error.field, error.field)  # say adapter_size, the name the caller wrote
            raise AdapterConfigError(f"hybrid adapter config: {field + ': ' if field else ''}{error.problem}",
                                     field, error.problem) from None


def add_hybrid_adapter_to_model(model: nn.Module, config: HybridAdapterConfig | AdapterConfig | dict) -> nn.Module:
    """LoRA on `apply_lora_to`, bottleneck adapters after `target_modules`, base frozen; in place, returns model."""
    if isinstance(config, HybridAdapterConfig):
        config = config.to_adapter_config()
    elif isinstance(config, dict):
        config = AdapterConfig.from_dict(config)
    if config.method != "hybrid":
        raise AdapterConfigError(f"add_hybrid_adapter_to_model needs method='hybrid', got {config.method!r}; "
                                 f"use add_adapters for the other methods")
    return add_adapters(model, config)
