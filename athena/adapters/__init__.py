"""Athena adapters: LoRA, IA3, routed LoRA experts (PolyAdapter), bottleneck adapters and the hybrid mode,
for TRM and Hugging Face models, in plain PyTorch (no Hydra needed).

    from athena.adapters import AdapterConfig, add_adapters, adapter_aux_loss
    model = add_adapters(model, AdapterConfig(method="poly", rank=8))   # in place; base frozen
    loss = task_loss + (adapter_aux_loss(model) or 0)                     # router losses, if any

Layout, each module importing only those above it:
    config.py       AdapterConfig: every knob's type, bounds and default; AdapterConfigError
    linear.py       the linear layers adapters wrap (base_dims) and Int8Linear
    base.py         AdapterLayer, what every wrapper has; model-wide functions written against it
    targets.py      which layers get adapters: family defaults, matching, per-module ranks
    parts/          lora.py, ia3.py, experts.py: the parts PolyAdapter composes (forward, merge, unmerge)
    poly.py         PolyAdapter
    bottleneck.py   BottleneckAdapter and BottleneckWrapper
    inject.py       add_adapters: wrap the targets, freeze the base, refuse stacking
    hybrid.py       HybridAdapterConfig and add_hybrid_adapter_to_model
    merge.py        merge_adapters, unmerge_adapters, merge_and_unload
    io.py           save_adapter / load_adapter (peft's format for LoRA-only and IA3-only adapters)
    quantize.py     quantize_adapter_model: an int8 base under the adapters
"""

from athena.adapters.base import AdapterLayer, adapter_aux_loss, adapter_parameters, count_parameters
from athena.adapters.bottleneck import BottleneckAdapter, BottleneckWrapper
from athena.adapters.config import AdapterConfig, AdapterConfigError
from athena.adapters.hybrid import HybridAdapterConfig, add_hybrid_adapter_to_model
from athena.adapters.inject import add_adapters
from athena.adapters.io import load_adapter, save_adapter
from athena.adapters.linear import Int8Linear
from athena.adapters.merge import merge_adapters, merge_and_unload, unmerge_adapters
from athena.adapters.poly import PolyAdapter
from athena.adapters.quantize import quantize_adapter_model

__all__ = [
    "AdapterConfig", "AdapterConfigError", "AdapterLayer", "PolyAdapter", "BottleneckAdapter", "BottleneckWrapper",
    "HybridAdapterConfig", "add_adapters", "add_hybrid_adapter_to_model", "adapter_aux_loss", "adapter_parameters",
    "merge_adapters", "unmerge_adapters", "merge_and_unload", "save_adapter", "load_adapter",
    "quantize_adapter_model", "Int8Linear", "count_parameters",
]
