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
    autorank/       AutoRank: per-module LoRA ranks under a budget (GP search, random search, importance)

Names are loaded on first use (module __getattr__): `athena.config` validates a run's `adapter:` against
AdapterConfig without importing torch, which keeps `pretrain.py --help` and a bad config fast.
"""

from athena.lazy import lazy_exports

_EXPORTS = {  # public name -> the module that defines it
    "AdapterConfig": ".config", "AdapterConfigError": ".config",
    "Int8Linear": ".linear",
    "AdapterLayer": ".base", "adapter_aux_loss": ".base", "adapter_parameters": ".base", "count_parameters": ".base",
    "PolyAdapter": ".poly",
    "BottleneckAdapter": ".bottleneck", "BottleneckWrapper": ".bottleneck",
    "add_adapters": ".inject",
    "HybridAdapterConfig": ".hybrid", "add_hybrid_adapter_to_model": ".hybrid",
    "merge_adapters": ".merge", "unmerge_adapters": ".merge", "merge_and_unload": ".merge",
    "save_adapter": ".io", "load_adapter": ".io",
    "quantize_adapter_model": ".quantize",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
