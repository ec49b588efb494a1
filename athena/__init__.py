"""Athena: experiments on small recursive-reasoning models and efficient adaptation.

The names users reach for, importable from here (`from athena import PolyAdapter, add_adapters`); `import athena`
loads torch but not Hydra, transformers or peft.
"""

from athena.adapters import (
    AdapterConfig,
    HybridAdapterConfig,
    PolyAdapter,
    adapter_aux_loss,
    add_adapters,
    add_hybrid_adapter_to_model,
    load_adapter,
    merge_and_unload,
    quantize_adapter_model,
    save_adapter,
)
from athena.models import TinyRecursiveModel

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "HybridAdapterConfig", "PolyAdapter", "adapter_aux_loss", "add_adapters",
    "add_hybrid_adapter_to_model", "load_adapter", "merge_and_unload", "quantize_adapter_model", "save_adapter",
    "TinyRecursiveModel",
]
