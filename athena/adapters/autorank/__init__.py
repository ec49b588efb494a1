"""AutoRank: where LoRA capacity goes. Per-module ranks from a candidate set under a global budget, found by
Bayesian optimisation over short trial runs (search.py) or allocated from gradient sensitivities (importance.py).

    space.py       RankSpace: slots (layer x module) x candidate ranks, the budget, feasible choices, rank_pattern
    search.py      AutoRank (GP + log expected improvement, botorch) and RandomRankSearch, resumable trials files
    importance.py  analyze_layer_importance, set_dynamic_rank_allocation

Hydra runs the search as a multirun of pretrain.py through the sweeper in hydra_plugins/athena_autorank.
"""

from athena.lazy import lazy_exports

_EXPORTS = {
    "RankSpace": ".space", "AutoRankError": ".space", "Slot": ".space", "Target": ".space",
    "AutoRank": ".search", "RandomRankSearch": ".search", "Trial": ".search",
    "analyze_layer_importance": ".importance", "set_dynamic_rank_allocation": ".importance",
    "importance_by_layer": ".importance",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
