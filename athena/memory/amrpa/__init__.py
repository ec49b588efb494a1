"""AMRPA: a memory of earlier layers' attention patterns, gated into the attention of chosen layers of a Hugging Face
transformer, in plain PyTorch (no Hydra needed).

    from athena.memory.amrpa import AMRPAConfig, inject_amrpa, get_amrpa_metrics, amrpa_aux_loss
    model = inject_amrpa(model, AMRPAConfig(target_layers="last_4"))   # in place; base frozen by default
    loss = task_loss + (amrpa_aux_loss(model) or 0)                    # the regularisers of the last forward

Layout, each module importing only those above it:
    config.py   AMRPAConfig (every knob's type, bounds, default), target-layer patterns, AMRPAConfigError
    layer.py    the attention function (explicit probabilities), AMRPAMemory (selection MLP + gate), AMRPAState
    inject.py   inject_amrpa, metrics, reset, regularisers, save/load

Names are loaded on first use (module __getattr__): athena.config validates a run's `memory:` against AMRPAConfig
without importing torch.
"""

from athena.lazy import lazy_exports

_EXPORTS = {  # public name -> the module that defines it
    "AMRPAConfig": ".config", "AMRPAConfigError": ".config", "resolve_layers": ".config",
    "AMRPAMemory": ".layer",
    "inject_amrpa": ".inject", "get_amrpa_metrics": ".inject", "reset_amrpa_history": ".inject",
    "amrpa_aux_loss": ".inject", "amrpa_parameters": ".inject", "amrpa_state_dict": ".inject", "save_amrpa": ".inject",
    "load_amrpa": ".inject",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
