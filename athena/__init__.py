"""Athena: experiments on small recursive-reasoning models and efficient adaptation.

The names users reach for come from here: `from athena import PolyAdapter, add_adapters, TinyRecursiveModel`.
They are loaded on first use (module __getattr__), so `import athena.config` (what pretrain.py and evaluate.py
run before validating a config) and `import athena` import no torch; the first name used loads it.
"""

from athena.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the module that defines it
    "AdapterConfig": "athena.adapters.config",
    "HybridAdapterConfig": "athena.adapters.hybrid",
    "PolyAdapter": "athena.adapters.poly",
    "add_adapters": "athena.adapters.inject",
    "add_hybrid_adapter_to_model": "athena.adapters.hybrid",
    "adapter_aux_loss": "athena.adapters.base",
    "save_adapter": "athena.adapters.io",
    "load_adapter": "athena.adapters.io",
    "merge_and_unload": "athena.adapters.merge",
    "quantize_adapter_model": "athena.adapters.quantize",
    "TinyRecursiveModel": "athena.models.trm",
    "HierarchicalAdaptiveWrapper": "athena.adaptive.wrapper",
    "ProgressiveFreezingScheduler": "athena.training.freezing",
    "RehearsalBuffer": "athena.memory.rehearsal",
    "AutoRank": "athena.adapters.autorank.search",
    "set_dynamic_rank_allocation": "athena.adapters.autorank.importance",
    "analyze_layer_importance": "athena.adapters.autorank.importance",
    "AMRPAConfig": "athena.memory.amrpa.config",
    "inject_amrpa": "athena.memory.amrpa.inject",
    "get_amrpa_metrics": "athena.memory.amrpa.inject",
    "reset_amrpa_history": "athena.memory.amrpa.inject",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
