"""Athena adapters: LoRA, IA3, routed LoRA experts (PolyAdapter), bottleneck adapters and the hybrid mode,
for TRM and Hugging Face models, in plain PyTorch (no Hydra needed).

    from athena.adapters import AdapterConfig, add_adapters, adapter_aux_loss
    model = add_adapters(model, AdapterConfig(method="poly", rank=8))   # in place; base frozen
    loss = task_loss + (adapter_aux_loss(model) or 0)                     # router losses, if any

Layout: config.py (AdapterConfig + validation), poly/layer.py (PolyAdapter), bottleneck/layer.py
(BottleneckAdapter), hybrid/model.py (hybrid entry), targets.py (default targets per model family, matching),
model.py (wrapping, freezing, merge, aux loss), io.py (save/load incl. peft format), quantize.py (int8 base).
"""

from athena.adapters.bottleneck.layer import BottleneckAdapter
from athena.adapters.config import AdapterConfig, AdapterConfigError
from athena.adapters.hybrid.model import BottleneckWrapper, add_hybrid_adapter_to_model
from athena.adapters.io import load_adapter, save_adapter
from athena.adapters.model import (
    adapter_aux_loss,
    adapter_parameters,
    add_adapters,
    count_parameters,
    merge_adapters,
    merge_and_unload,
    unmerge_adapters,
)
from athena.adapters.poly.layer import PolyAdapter
from athena.adapters.quantize import Int8Linear, quantize_adapter_model

__all__ = [
    "AdapterConfig", "AdapterConfigError", "PolyAdapter", "BottleneckAdapter", "BottleneckWrapper",
    "add_adapters", "add_hybrid_adapter_to_model", "adapter_aux_loss", "adapter_parameters",
    "merge_adapters", "unmerge_adapters", "merge_and_unload", "save_adapter", "load_adapter",
    "quantize_adapter_model", "Int8Linear", "count_parameters",
]
