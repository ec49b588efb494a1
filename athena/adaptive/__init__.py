"""Hierarchical adaptive computation over a frozen Hugging Face causal LM: exit gates (tokens leave at a few depths)
and capacity routers (a fraction of the still-active tokens runs each layer's FFN), in plain PyTorch (no Hydra).

    from athena.adaptive import HierarchicalAdaptiveWrapper
    model = HierarchicalAdaptiveWrapper(base_model, capacity=0.55)   # base frozen; gates + routers train
    loss = lm_loss + sum(model.aux_losses().values())                 # router z-loss, entropy, exit compute

Layout, each module importing only those above it:
    config.py           ExitConfig: every knob once (type, bounds, default); the `exit` group's schema. No torch.
    layout.py           where a Llama-layout decoder keeps its parts; a one-line refusal for other layouts
    exit_gates.py       ExitGate: per-token stop decision (Gumbel straight-through in training, hard in eval)
    capacity_router.py  CapacityRouter: per-token FFN score, top-k per sequence or a causal threshold; aux losses
    wrapper.py          HierarchicalAdaptiveWrapper: the forward loop, token states, KV cache, greedy generate
    speed.py            ceilings from shapes, and the target-speedup search over capacity
    infer.py            `python -m athena.adaptive.infer`: generate, target speedup, benchmark table

Names are loaded on first use, so `athena.config` reads ExitConfig without importing torch.
"""

from athena.lazy import lazy_exports

_EXPORTS = {  # public name -> the module that defines it
    "ExitConfig": ".config", "AdaptiveConfigError": ".config", "default_exit_layers": ".config",
    "ExitGate": ".exit_gates", "CapacityRouter": ".capacity_router",
    "HierarchicalAdaptiveWrapper": ".wrapper", "AdaptiveCache": ".wrapper", "wrap_model": ".wrapper",
    "search_capacity_for_speedup": ".speed", "flop_ceiling": ".speed",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
