"""Rank allocation without a search: a gradient-based sensitivity per target module, and ranks that follow it.

    importance = analyze_layer_importance(model, batches)          # {module path: sum |grad * weight|}
    pattern = set_dynamic_rank_allocation(model, importance, min_rank=2, max_rank=16, rank_budget=64)

The sensitivity of a weight matrix is the first-order change of the loss if it were removed, |dL/dW * W| summed over
its entries (and over a few batches): a module whose weights the loss barely depends on needs little adapter
capacity. Ranks grow in proportion to it between min_rank and max_rank; with a budget the proportion is scaled to
spend as much of it as fits.
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch import nn

from athena.adapters.autorank.space import AutoRankError, RankSpace, lora_config
from athena.adapters.config import AdapterConfig
from athena.adapters.inject import add_adapters
from athena.adapters.linear import base_dims
from athena.adapters.targets import layer_index, select_modules

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def analyze_layer_importance(model: nn.Module, data: Iterable, *, loss_fn: LossFn | None = None,
                             num_batches: int | None = 4, adapter_config: AdapterConfig | dict | None = None,
                             ) -> dict[str, float]:
    """{target module path: sum over `num_batches` batches of sum |grad . weight|} for the modules LoRA would wrap
    (adapter_config's targets; default the family's). The model's parameters, their requires_grad and its train/eval
    mode are as before afterwards; it runs in eval mode (no dropout noise in the gradients).

    loss_fn(model, batch) -> scalar loss; default: a batch with input_ids goes through model(**batch).loss, one with
    Athena's inputs/labels through model(input_ids=inputs, labels=labels).loss."""
    config = lora_config(adapter_config)
    paths = select_modules(model, config.target_modules, config, "target_modules", "targets")
    weights = {path: _base_weight(model.get_submodule(path)) for path in paths}
    loss_fn = loss_fn or default_loss
    device = next(model.parameters()).device
    totals = {path: torch.zeros((), dtype=torch.float64, device=device) for path in paths}
    with _only_these_train(model, list(weights.values())):
        for index, batch in enumerate(data):
            if num_batches is not None and index >= num_batches:
                break
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            with torch.no_grad():
                for (path, weight), grad in zip(weights.items(), grads):
                    if grad is not None:  # a module the loss does not reach has sensitivity 0
                        totals[path] += (grad.double() * weight.double()).abs().sum()
    return {path: float(value) for path, value in totals.items()}


def importance_by_layer(importance: dict[str, float]) -> dict[int, float]:
    """Module sensitivities summed per layer index (modules outside numbered blocks are left out)."""
    out: dict[int, float] = defaultdict(float)
    for path, value in importance.items():
        layer = layer_index(path)
        if layer is not None:
            out[layer] += value
    return dict(sorted(out.items()))


def set_dynamic_rank_allocation(model: nn.Module, layer_importance: dict[str | int, float], min_rank: int = 2,
                                max_rank: int = 16, *, rank_budget: int | None = None, param_budget: int | None = None,
                                adapter_config: AdapterConfig | dict | None = None, apply: bool = True,
                                ) -> dict[str, int]:
    """Ranks that follow importance, as a rank_pattern; with apply (default) LoRA is added to `model` with it.

    layer_importance: {module path: value} (analyze_layer_importance) or {layer index: value} (every target of that
    layer shares it). Without a budget a module gets min_rank + (max_rank - min_rank) * importance / max importance;
    with rank_budget (total rank) or param_budget (trainable parameters) ranks are round(s * importance) clipped to
    [min_rank, max_rank], with the largest scale s whose pattern fits the budget. min_rank 0 leaves the least
    important modules without an adapter."""
    if isinstance(min_rank, bool) or isinstance(max_rank, bool) or not (0 <= min_rank <= max_rank) or max_rank < 1:
        raise AutoRankError(f"set_dynamic_rank_allocation: need 0 <= min_rank <= max_rank and max_rank >= 1, got "
                            f"min_rank={min_rank!r}, max_rank={max_rank!r}")
    space = RankSpace.from_model(model, candidates=range(min_rank, max_rank + 1), adapter_config=adapter_config,
                                 rank_budget=rank_budget if param_budget is None else None, param_budget=param_budget
                                 ) if (rank_budget is not None or param_budget is not None) else None
    config = lora_config(adapter_config)
    paths = select_modules(model, config.target_modules, config, "target_modules", "targets")
    scores = _per_path(paths, layer_importance)
    top = max(scores.values())
    if top <= 0:
        raise AutoRankError("set_dynamic_rank_allocation: every importance is 0 (no gradient reached the targets?)")
    if space is None:
        ranks = {p: round(min_rank + (max_rank - min_rank) * s / top) for p, s in scores.items()}
    else:
        ranks = _fit_budget(space, scores, min_rank, max_rank)
    pattern = {re.escape(p): int(r) for p, r in ranks.items()}
    if apply:
        add_adapters(model, AdapterConfig.from_dict({**config.to_dict(), "rank_pattern": pattern,
                                                     "rank": max(pattern.values())}))
    return pattern


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    device = next(model.parameters()).device
    if isinstance(batch, dict) and "input_ids" in batch:
        return model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}).loss
    if isinstance(batch, dict) and {"inputs", "labels"} <= set(batch):
        return model(input_ids=batch["inputs"].to(device), labels=batch["labels"].to(device)).loss
    raise AutoRankError("analyze_layer_importance: batches need input_ids (Hugging Face) or inputs + labels "
                        "(Athena's causal LM); otherwise pass loss_fn(model, batch) -> loss")


def _fit_budget(space: RankSpace, scores: dict[str, float], min_rank: int, max_rank: int) -> dict[str, int]:
    """Bisect the scale s of round(s * score) (clipped) to the largest whose cost fits the budget."""
    by_slot = [slot.targets[0].path for slot in space.slots]  # from_model with layers_per_slot=1: one target a slot

    def ranks_at(scale: float) -> tuple[int, ...]:
        return tuple(min(max_rank, max(min_rank, round(scale * scores[p]))) for p in by_slot)

    lo, hi = 0.0, max_rank / min(s for s in scores.values() if s > 0)  # hi: every module with a score at max_rank
    if space.cost(ranks_at(hi)) <= space.budget:
        lo = hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if space.cost(ranks_at(mid)) <= space.budget else (lo, mid)
    ranks = ranks_at(lo)
    if not any(ranks):
        raise AutoRankError(f"set_dynamic_rank_allocation: {space.unit}_budget={space.budget} cannot give the most "
                            "important module rank 1; raise the budget")
    return dict(zip(by_slot, ranks))


def _per_path(paths: list[str], importance: dict[str | int, float]) -> dict[str, float]:
    if not importance:
        raise AutoRankError("set_dynamic_rank_allocation: layer_importance is empty")
    if all(isinstance(k, int) for k in importance):
        return {p: float(importance.get(layer_index(p), 0.0)) for p in paths}
    unknown = sorted(set(importance) - set(paths))
    if unknown:
        raise AutoRankError(f"set_dynamic_rank_allocation: {unknown[:3]} are not target modules; keys are module "
                            f"paths (e.g. {paths[0]!r}) or layer indices")
    return {p: float(importance.get(p, 0.0)) for p in paths}


def _base_weight(module: nn.Module) -> torch.Tensor:
    inner = getattr(module, "base_layer", module)
    base_dims(inner)  # a supported linear layer, or TypeError
    return inner.weight


@contextlib.contextmanager
def _only_these_train(model: nn.Module, weights: list[torch.Tensor]):
    """Gradients for `weights` only, in eval mode; requires_grad and the mode are restored afterwards."""
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    ids = {id(w) for w in weights}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    model.eval()
    try:
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
