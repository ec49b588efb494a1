"""Put adapters into a model: wrap the target layers (targets.py picks them), freeze the rest; merge, aux loss,
counting."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from athena.adapters.config import AdapterConfig, AdapterConfigError
from athena.adapters.poly.layer import PolyAdapter
from athena.adapters.targets import select_modules


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def poly_adapter_for(base: nn.Module, name: str, config: AdapterConfig) -> PolyAdapter:
    rank = config.rank_for(name)
    experts = dict(num_experts=config.num_experts, top_k=config.top_k, expert_rank=config.expert_rank or rank,
                   router_aux_weight=config.router_aux_weight, router_z_weight=config.router_z_weight)
    return PolyAdapter(
        base, rank=rank, alpha=config.alpha, dropout=config.dropout, use_lora=config.lora_on,
        use_ia3=config.ia3_on, use_moe=config.moe_on, use_rslora=config.use_rslora,
        ia3_recompute=config.ia3_recompute, **(experts if config.moe_on else {}),
    )


def add_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap the target linears of `model` in PolyAdapters (in place) and freeze the base; returns `model`.

    method="hybrid" goes to add_hybrid_adapter_to_model. Calling it on a model that already has adapters is an
    error (stacking adapters is not supported).
    """
    if isinstance(config, dict):
        config = AdapterConfig.from_dict(config)
    if config.method == "hybrid":
        from athena.adapters.hybrid.model import add_hybrid_adapter_to_model

        return add_hybrid_adapter_to_model(model, config)
    _refuse_stacking(model)
    for name in select_modules(model, config.target_modules, config, "target_modules", "targets"):
        set_module(model, name, poly_adapter_for(model.get_submodule(name), name, config))
    finish(model, config)
    return model


def _refuse_stacking(model: nn.Module) -> None:
    if any(is_adapter_module(m) for m in model.modules()):
        raise AdapterConfigError("this model already has adapters; load them with load_adapter or start from a "
                                 "model without adapters (stacking adapters is not supported)")


def is_adapter_module(module: nn.Module) -> bool:
    from athena.adapters.bottleneck.layer import BottleneckAdapter

    return isinstance(module, (PolyAdapter, BottleneckAdapter))


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter parameter once (shared bottlenecks counted once), in module order."""
    from athena.adapters.bottleneck.layer import BottleneckAdapter

    params, seen = [], set()
    for m in model.modules():
        ps = m.adapter_parameters() if isinstance(m, PolyAdapter) else (
            list(m.parameters()) if isinstance(m, BottleneckAdapter) else [])
        for p in ps:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def finish(model: nn.Module, config: AdapterConfig) -> None:
    """Freeze every non-adapter parameter (puzzle embedding included) when freeze_base; adapters trainable."""
    adapter_ids = {id(p) for p in adapter_parameters(model)}
    for p in model.parameters():
        if id(p) in adapter_ids:
            p.requires_grad_(True)
        elif config.freeze_base:
            p.requires_grad_(False)
    model.adapter_config = config  # remembered by save_adapter and the trainer


def adapter_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the router losses of every PolyAdapter's grad-enabled forwards since the last call; resets them.

    All layers' router calls are gathered first and computed together (poly.layer.router_loss), a handful of
    kernels per step instead of ~10 per layer per call. None when the model has no router or no grad-enabled
    forward happened since the last call.
    """
    from athena.adapters.poly.layer import router_loss

    by_weights: dict[tuple[float, float], list] = {}
    for m in model.modules():
        if isinstance(m, PolyAdapter) and m.router is not None:
            by_weights.setdefault((m.router_aux_weight, m.router_z_weight), []).extend(m.pop_router_calls())
    total = None
    for (aux_weight, z_weight), calls in by_weights.items():
        term = router_loss(calls, aux_weight, z_weight)
        if term is not None:
            total = term if total is None else total + term.to(total.device)
    return total


def _count_unmergeable(model: nn.Module) -> tuple[int, int]:
    from athena.adapters.bottleneck.layer import BottleneckAdapter

    experts = sum(1 for m in model.modules() if isinstance(m, PolyAdapter) and m.router is not None and m.use_moe)
    bottlenecks = len({id(m) for m in model.modules() if isinstance(m, BottleneckAdapter)})
    return experts, bottlenecks


def _warn_unmergeable(model: nn.Module, what: str) -> None:
    experts, bottlenecks = _count_unmergeable(model)
    if experts or bottlenecks:
        warnings.warn(
            f"{what}: LoRA and IA3 are merged into the base weights, but {experts} layer(s) keep their routed "
            f"experts and {bottlenecks} bottleneck adapter(s) stay unmerged (they depend on the input, so they "
            f"cannot be folded into a weight); those still run as modules", stacklevel=3)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold LoRA and IA3 into the base weights of every PolyAdapter (outputs unchanged)."""
    for m in model.modules():
        if isinstance(m, PolyAdapter):
            m.merge()
    _warn_unmergeable(model, "merge_adapters")
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, PolyAdapter):
            m.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then replace each PolyAdapter without experts by its plain base layer.

    Layers with experts and bottleneck wrappers cannot be merged: they are kept (merged for their LoRA/IA3)
    and a warning says so plainly.
    """
    merge_adapters(model)
    names = [n for n, m in model.named_modules() if isinstance(m, PolyAdapter)]
    for name in names:
        m = model.get_submodule(name)
        if m.router is not None and m.use_moe:
            continue
        set_module(model, name, m.base_layer)
    if not any(is_adapter_module(m) for m in model.modules()) and hasattr(model, "adapter_config"):
        del model.adapter_config
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each tensor once; int8-quantised base weights count in total."""
    from athena.adapters.quantize import Int8Linear

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.weight.numel() + (0 if m.bias is None else m.bias.numel())
                 for m in model.modules() if isinstance(m, Int8Linear))
    return trainable, total
