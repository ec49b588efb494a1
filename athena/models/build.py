"""From a run config to the model a run trains or evaluates, by one path that pretrain.py and evaluate.py share.

    model = build_run_model(cfg, metadata)      # arch (sized by the data) -> init_from weights -> transforms

A model transform is `f(model, cfg) -> model`: adapters are the first built-in one (exit gates and AMRPA come
next, each a function in its own module added to BUILTIN_TRANSFORMS); `cfg.model_transforms` adds a run's own,
after them. Each transform must leave a model whose state dict the run's checkpoints hold.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from athena.adapters import AdapterConfig, AdapterConfigError, add_adapters
from athena.adaptive.config import AdaptiveConfigError
from athena.checkpoint import load_checkpoint, load_weights, model_weights
from athena.config import RunConfig, build_component
from athena.errors import ConfigError
from athena.memory.amrpa import AMRPAConfig, AMRPAConfigError, inject_amrpa

log = logging.getLogger("athena")

ModelTransform = Callable[[torch.nn.Module, RunConfig], torch.nn.Module]


def build_model(cfg: RunConfig, metadata) -> torch.nn.Module:
    """The arch node's `_target_`, sized by the dataset (vocab, sequence length, puzzle ids)."""
    return build_component(cfg.arch, vocab_size=metadata.vocab_size, seq_len=metadata.seq_len,
                           num_puzzle_identifiers=metadata.num_puzzle_identifiers)


def build_run_model(cfg: RunConfig, metadata, *, load_init: bool = True) -> torch.nn.Module:
    """build_model, then the init_from weights (a base checkpoint: before any transform adds modules), then every
    model transform in order. load_init=False when the caller loads a whole checkpoint of this run afterwards."""
    model = build_model(cfg, metadata)
    if load_init and cfg.init_from:
        load_init_weights(model, Path(cfg.init_from), cfg)
    for transform in model_transforms(cfg):
        model = transform(model, cfg)
    return model


def param_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, sparse) trainable parameters: the model's own split where it has one (TRM: the puzzle embedding is
    sparse, trained by sign-SGD), else every trainable parameter dense (a Hugging Face model)."""
    if hasattr(model, "param_groups"):
        return model.param_groups()
    return [p for p in model.parameters() if p.requires_grad], []


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP shards one by one: the model's own list where it has one (TRM), else a Hugging Face model's
    decoder layers, else none (the whole model is one unit)."""
    if hasattr(model, "fsdp_units"):
        return model.fsdp_units()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("layers", "h", "blocks"):
        units = getattr(decoder, name, None)
        if isinstance(units, nn.ModuleList):
            return list(units)
    return []


def model_transforms(cfg: RunConfig) -> list[ModelTransform]:
    extra = [build_component(node, partial=True) for node in cfg.model_transforms]
    return [*BUILTIN_TRANSFORMS, *extra]


def load_init_weights(model: torch.nn.Module, path: Path, cfg: RunConfig) -> None:
    """init_from: a checkpoint's weights (its EMA, the weights it evaluated and shipped, when it has one)."""
    state = load_checkpoint(path)
    weights = model_weights(state, "ema" if state.get("ema") else "raw")
    load_weights(model, weights, f"init_from={path}{trained_with(state, cfg.resolved(), ('arch', 'data'))}")
    log.info("initialised weights from %s", path)


def trained_with(state: dict[str, Any], current: dict[str, Any], sections: tuple[str, ...]) -> str:
    """' (trained with arch.hidden_size=64, this run 32)': the config keys that explain a misfit, if known."""
    saved = state.get("config") or {}
    keys = differing_keys(saved, current, sections)
    if not keys:
        return ""
    shown = [f"{k}={_lookup(saved, k)!r}, this run {_lookup(current, k)!r}" for k in keys[:2]]
    return f" (trained with {'; '.join(shown)})"


def differing_keys(saved: dict[str, Any], current: dict[str, Any], sections: tuple[str, ...]) -> list[str]:
    """'section.key' for every key of the given config sections whose value differs between two configs."""
    return [f"{section}.{key}" for section in sections
            for key in sorted(set(saved.get(section) or {}) | set(current.get(section) or {}))
            if (saved.get(section) or {}).get(key) != (current.get(section) or {}).get(key)]


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    section, key = dotted.split(".", 1)
    return (config.get(section) or {}).get(key)


# ----------------------------------------------------------------- built-in transforms

def apply_adapter(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    """adapter=<method>: athena.adapters.add_adapters with the adapter node's knobs, in place; none: unchanged."""
    if cfg.adapter.name == "none":
        return model
    try:
        return add_adapters(model, AdapterConfig(**cfg.adapter.adapter_kwargs()))
    except AdapterConfigError as error:
        raise ConfigError(f"adapter={cfg.adapter.name}: {error}") from None


def check_adapter_has_base(cfg: RunConfig, resuming: bool | None = None) -> None:
    """A frozen base needs pretrained weights: stop (one line, before any data or compute) instead of training
    adapters on a random network. Resuming an adapter run is fine without init_from (the checkpoint holds the
    base); `resuming` None means "if resume is set" (resume=auto that finds nothing checks again, as False)."""
    adapter = cfg.adapter
    resuming = cfg.resume != "none" if resuming is None else resuming
    pretrained = bool(getattr(cfg.arch_config, "pretrained", None))  # the arch loads its own weights (SmolLM2)
    if adapter.name != "none" and adapter.freeze_base and not (cfg.init_from or resuming or pretrained):
        raise ConfigError(
            f"adapter={adapter.name} freezes the base but init_from is not set: adapters would train on a random "
            "network; set init_from=<pretrained checkpoint> or adapter.freeze_base=false"
        )


def apply_exit(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    """exit=hierarchical: the model inside a HierarchicalAdaptiveWrapper (exit gates + capacity routers; base frozen,
    exit.phase picks what trains); none: unchanged."""
    if cfg.exit.name == "none":
        return model
    from athena.adaptive.wrapper import HierarchicalAdaptiveWrapper

    try:
        return HierarchicalAdaptiveWrapper(model, **cfg.exit.wrapper_kwargs())
    except AdaptiveConfigError as error:
        raise ConfigError(f"exit={cfg.exit.name}: {error}") from None


def apply_memory(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    """memory=amrpa: athena.memory.amrpa.inject_amrpa with the memory node's knobs, in place; none: unchanged. After
    the adapter: AMRPA's freeze_base_model freezes every parameter the model has by then (adapters included)."""
    if cfg.memory.name == "none":
        return model
    try:
        return inject_amrpa(model, AMRPAConfig(**cfg.memory.amrpa_kwargs()))
    except AMRPAConfigError as error:
        raise ConfigError(f"memory={cfg.memory.name}: {error}") from None


BUILTIN_TRANSFORMS: tuple[ModelTransform, ...] = (apply_adapter, apply_memory, apply_exit)
