"""Put adapters into a model: pick the target layers (targets.py), replace each by its wrapper, then set what
trains. Every method goes through add_adapters; hybrid.py is the hybrid method's own entry point on top of it.

    lora / ia3 / moe / poly: target_modules (default: the family's linear layers) -> PolyAdapter
    hybrid: apply_lora_to  (default: the family's attention projections) -> PolyAdapter (LoRA; IA3/experts if asked)
            target_modules (default: the family's FFN output projection) -> BottleneckWrapper
"""

from __future__ import annotations

from torch import nn

from athena.adapters.base import adapter_parameters, has_adapters
from athena.adapters.bottleneck import BottleneckAdapter, BottleneckWrapper
from athena.adapters.config import AdapterConfig, AdapterConfigError
from athena.adapters.linear import base_dims
from athena.adapters.poly import PolyAdapter
from athena.adapters.targets import rank_for, select_modules


def add_adapters(model: nn.Module, config: AdapterConfig | dict) -> nn.Module:
    """Wrap the target layers of `model` in adapters (in place), freeze the base when config.freeze_base, and
    remember the config on the model (save_adapter reads it); returns `model`.

    Calling it on a model that already has adapters is an error (stacking adapters is not supported).
    """
    if isinstance(config, dict):
        config = AdapterConfig.from_dict(config)
    refuse_stacking(model)
    if config.method == "hybrid":
        _wrap_hybrid_targets(model, config)
    else:
        targets = select_modules(model, config.target_modules, config, "target_modules", "targets")
        for name in without_rank_zero(targets, config):
            set_module(model, name, poly_adapter_for(model.get_submodule(name), name, config))
    set_trainable(model, config.freeze_base)
    model.adapter_config = config
    return model


def without_rank_zero(targets: list[str], config: AdapterConfig) -> list[str]:
    """The targets whose rank_pattern rank is not 0 (rank 0: no adapter there); an error if that leaves none."""
    kept = [name for name in targets if rank_for(config, name) > 0]
    if targets and not kept:
        raise AdapterConfigError(f"adapter config: rank_pattern gives rank 0 to every target ({len(targets)} modules): "
                                 "nothing would be adapted; give at least one module a rank >= 1")
    return kept


def refuse_stacking(model: nn.Module) -> None:
    if has_adapters(model):
        raise AdapterConfigError("this model already has adapters; load them with load_adapter or start from a "
                                 "model without adapters (stacking adapters is not supported)")


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def poly_adapter_for(base: nn.Module, name: str, config: AdapterConfig) -> PolyAdapter:
    rank = rank_for(config, name)
    experts = dict(num_experts=config.num_experts, top_k=config.top_k, expert_rank=config.expert_rank or rank,
                   router_aux_weight=config.router_aux_weight, router_z_weight=config.router_z_weight)
    return PolyAdapter(
        base, rank=rank, alpha=config.alpha, dropout=config.dropout, use_lora=config.lora_on,
        use_ia3=config.ia3_on, use_moe=config.moe_on, use_rslora=config.use_rslora,
        ia3_recompute=config.ia3_recompute, **(experts if config.moe_on else {}),
    )


def _wrap_hybrid_targets(model: nn.Module, config: AdapterConfig) -> None:
    # Select both sets before wrapping anything, so a module can be in both (then: bottleneck(LoRA(x))).
    lora_targets = []
    if config.apply_lora_to != [] and (config.lora_on or config.ia3_on or config.moe_on):
        lora_targets = [name for name in select_modules(model, config.apply_lora_to, config, "apply_lora_to",
                                                        "attention") if rank_for(config, name) > 0]
    ffn_targets = select_modules(model, config.target_modules, config, "target_modules", "ffn_out")

    for name in lora_targets:
        set_module(model, name, poly_adapter_for(model.get_submodule(name), name, config))
    shared: dict[int, BottleneckAdapter] = {}  # output width -> the adapter all layers of that width share
    for name in ffn_targets:
        module = model.get_submodule(name)
        inner = module.base_layer if hasattr(module, "base_layer") else module
        _, out_features, _ = base_dims(inner)
        w = inner.weight
        adapter = shared.get(out_features) if config.share_across_layers else None
        if adapter is None:
            adapter = BottleneckAdapter(
                out_features, config.bottleneck_size, config.bottleneck_activation, config.bottleneck_dropout,
                config.bottleneck_gating, device=w.device, dtype=w.dtype if w.is_floating_point() else None)
            shared[out_features] = adapter
        set_module(model, name, BottleneckWrapper(module, adapter))


def set_trainable(model: nn.Module, freeze_base: bool) -> None:
    """Adapter parameters train; with freeze_base every other parameter (puzzle embedding included) is frozen,
    without it the rest keeps its requires_grad."""
    adapter_ids = {id(p) for p in adapter_parameters(model)}
    for p in model.parameters():
        if id(p) in adapter_ids:
            p.requires_grad_(True)
        elif freeze_base:
            p.requires_grad_(False)
