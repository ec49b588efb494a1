"""Put adapters into a model: find target layers, wrap them, freeze the rest; merge, aux loss, counting.

Module paths are matched with one rule (`matches`): a pattern selects a module when it matches, as a regex,
the whole path or a dot-separated suffix of it. So a plain name like "q_proj" or "attn.o_proj" matches every
module whose path ends with it, and "net\\.layers\\.0\\..*" style regexes work too.
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from athena.adapters.config import AdapterConfig, AdapterConfigError
from athena.adapters.poly.layer import PolyAdapter, base_dims

# Per-family defaults: every adapted linear (`targets`), attention projections (hybrid LoRA) and the FFN
# output (hybrid bottleneck). BERT's FFN output "output.dense" must not catch "attention.output.dense".
# TRM-MLP mixes tokens with a sequence MLP instead of attention; hybrid's LoRA goes there in its place.
FAMILIES = {
    "trm": dict(
        targets=["attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj",
                 "seq_mlp.gate_up_proj", "seq_mlp.down_proj"],
        attention=["attn.qkv_proj", "attn.o_proj", "seq_mlp.gate_up_proj", "seq_mlp.down_proj"],
        ffn_out=[r"layers\.\d+\.mlp\.down_proj"],
    ),
    "llama": dict(
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        attention=["q_proj", "k_proj", "v_proj", "o_proj"],
        ffn_out=["mlp.down_proj"],
    ),
    "gpt2": dict(
        targets=["c_attn", "c_proj", "c_fc"],
        attention=["attn.c_attn", "attn.c_proj"],
        ffn_out=["mlp.c_proj"],
    ),
    "bert": dict(
        targets=["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
        attention=["query", "key", "value", "attention.output.dense"],
        ffn_out=[r"(?<!attention\.)output\.dense"],
    ),
}
_MODEL_TYPES = {
    "llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama",
    "gemma2": "llama", "phi3": "llama", "olmo": "llama", "gpt2": "gpt2", "bert": "bert", "roberta": "bert",
    "xlm-roberta": "bert", "distilbert": "bert", "electra": "bert", "mpnet": "bert",
}


def matches(pattern: str, name: str) -> bool:
    """True if `pattern` (regex or plain name) matches the full module path or a dot-separated suffix of it."""
    try:
        return re.fullmatch(rf"(?:.*\.)?(?:{pattern})", name) is not None
    except re.error:  # not a valid regex: compare as a plain suffix
        return name == pattern or name.endswith("." + pattern)


def layer_index(name: str) -> int | None:
    """The first integer component of a module path (`net.layers.3.attn` -> 3), or None."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def is_wrappable(module: nn.Module) -> bool:
    try:
        base_dims(module)
        return True
    except TypeError:
        return False


def detect_family(model: nn.Module) -> str | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    names = [n for n, _ in model.named_modules()]
    suffix = lambda s: any(n == s or n.endswith("." + s) for n in names)  # noqa: E731
    if suffix("qkv_proj") or any(n.endswith("seq_mlp.down_proj") for n in names):
        return "trm"
    if suffix("q_proj"):
        return "llama"
    if suffix("c_attn"):
        return "gpt2"
    if suffix("query"):
        return "bert"
    return None


def family_defaults(model: nn.Module, key: str, field_name: str) -> list[str]:
    family = detect_family(model)
    if family is None:
        raise AdapterConfigError(
            f"adapter config: cannot tell the model family of {type(model).__name__} to pick default targets; "
            f"set {field_name} (e.g. {field_name}=['q_proj','v_proj'])")
    return FAMILIES[family][key]


def select_modules(model: nn.Module, patterns: list[str] | None, config: AdapterConfig, field_name: str,
                   default_key: str) -> list[str]:
    """Paths of the wrappable layers selected by `patterns` (None -> family defaults), minus skipped layers.

    User-given patterns must each select at least one linear layer (catches typos); defaults may miss
    (the TRM list names both the attention and the MLP mixer).
    """
    user_given = patterns is not None
    patterns = list(patterns) if user_given else family_defaults(model, default_key, field_name)
    # Do not descend into existing adapters' own parts (lora_A, router, ...): only real base layers.
    parts = adapter_part_ids(model)
    candidates = [n for n, m in model.named_modules()
                  if n and is_wrappable(m) and id(m) not in parts and not n.endswith("base_layer")]
    chosen = []
    for pattern in patterns:
        hits = [n for n in candidates if matches(pattern, n)]
        if user_given and not hits:
            examples = sorted({n.split(".")[-1] for n in candidates})[:8]
            raise AdapterConfigError(
                f"adapter config: {field_name} entry {pattern!r} matches no linear layer of {type(model).__name__}; "
                f"layer names that exist include {examples}")
        chosen += [n for n in hits if n not in chosen]
    if not chosen:
        raise AdapterConfigError(f"adapter config: {field_name} (defaults {patterns}) matches no linear layer of "
                                 f"{type(model).__name__}; set {field_name} explicitly")
    skip = set(config.layers_to_skip)
    return [n for n in chosen if layer_index(n) not in skip]


def adapter_part_ids(model: nn.Module) -> set[int]:
    """ids of the modules that belong to adapters (LoRA A/B, router, bottleneck layers), not to the base."""
    from athena.adapters.bottleneck.layer import BottleneckAdapter

    ids = set()
    for m in model.modules():
        if isinstance(m, PolyAdapter):
            for n, sub in m.named_modules():
                if n and not n.startswith("base_layer"):
                    ids.add(id(sub))
        elif isinstance(m, BottleneckAdapter):
            ids.update(id(sub) for sub in m.modules())
    return ids


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _unwrap(module: nn.Module) -> nn.Module:
    """The innermost base layer under any adapter wrappers."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def poly_adapter_for(base: nn.Module, name: str, config: AdapterConfig) -> PolyAdapter:
    rank = config.rank_for(name)
    return PolyAdapter(
        base, rank=rank, alpha=config.alpha, dropout=config.dropout, use_lora=config.lora_on,
        use_ia3=config.ia3_on, use_moe=config.moe_on, num_experts=config.num_experts, top_k=config.top_k,
        expert_rank=config.expert_rank or rank, use_rslora=config.use_rslora,
        router_aux_weight=config.router_aux_weight, router_z_weight=config.router_z_weight,
        ia3_recompute=config.ia3_recompute,
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
