"""Putting AMRPA into a Hugging Face transformer, reading what it did, saving and loading it.

    model = inject_amrpa(AutoModel.from_pretrained(folder))               # the last 4 layers, defaults
    model = inject_amrpa(model, AMRPAConfig(target_layers="6:10"))        # or target_layers=[6, 7, 8, 9]
    outputs = model(**inputs)                                             # the model's own call signature
    get_amrpa_metrics(model)["gate_impact"]                               # one value per targeted layer
    loss = loss + amrpa_aux_loss(model)                                   # the regularisers of the last forward
    save_amrpa(model, folder); load_amrpa(fresh_model, folder)            # config + AMRPA weights only

How it goes in: every self-attention module of the model is found (in call order; ALBERT's one shared module is
called once per depth). A targeted module gets a child `amrpa` (one AMRPAMemory per targeted depth), and it and the
modules of the earlier depths the windows reach get a private copy of the model config whose attention
implementation is AMRPA's function (athena.memory.amrpa.layer). The modules, their weights and the model config stay
the model's own: a base checkpoint loads into an injected model, save_pretrained writes the base config, and the
AMRPA weights are the only new state-dict keys (`...amrpa.<depth>.selector...`). A forward pre-hook on each
attention module counts depth and hands the hidden state to the selection MLP; one on the model starts each forward
with an empty history.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from torch import nn

from athena.memory.amrpa.config import AMRPAConfig, AMRPAConfigError, resolve_layers
from athena.memory.amrpa.layer import ATTENTION_NAME, AMRPAMemory, AMRPAState, amrpa_attention

log = logging.getLogger("athena")

CONFIG_FILE = "amrpa_config.json"
WEIGHTS_FILE = "amrpa_model.safetensors"
METRIC_NAMES = ("gate_mean", "gate_impact", "alpha_diversity", "memory_similarity", "gate_strength")


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, amrpa_attention)


# ------------------------------------------------------------------------------------------------------ injecting

def inject_amrpa(model: nn.Module, config: AMRPAConfig | None = None,
                 target_layers: str | list[int] | None = None) -> nn.Module:
    """Add AMRPA to `model` in place and return it. `target_layers` overrides config.target_layers. Raises
    AMRPAConfigError (one line) for a model or pattern it cannot serve."""
    config = config if config is not None else AMRPAConfig()
    if target_layers is not None:
        config = AMRPAConfig(**{**config.to_dict(), "target_layers": target_layers})
    if getattr(model, "_amrpa_state", None) is not None:
        raise AMRPAConfigError("inject_amrpa: this model already has AMRPA; inject into a fresh model")
    hf_config = _check_model(model)
    modules, num_depths, module_at = attention_modules(model, hf_config)
    targets, windows = _targets_and_windows(config, num_depths)
    roles = {depth: "record" for t in targets for depth in range(t - windows[t], t)}
    roles.update({t: "target" for t in targets})
    base_parameters = list(model.parameters())

    _register_attention()
    state = AMRPAState(num_depths, roles, windows, getattr(hf_config, "_attn_implementation", None) or "eager")
    hidden_size, num_heads = _hidden_and_heads(hf_config)
    device = base_parameters[0].device if base_parameters else torch.device("cpu")
    for depth in targets:
        module = module_at(depth)
        if not hasattr(module, "amrpa"):
            module.amrpa = nn.ModuleDict()
        memory = AMRPAMemory(hidden_size, num_heads, windows[depth], config).to(device)
        module.amrpa[str(depth)] = memory.train(model.training)  # a model in eval mode gets its memory in eval mode
    for depth, module in enumerate(map(module_at, range(num_depths))):
        if depth in roles and getattr(module, "config", None) is hf_config:
            module.config = copy.copy(hf_config)  # its own copy: only these modules switch implementation
            module.config._attn_implementation_internal = ATTENTION_NAME
    for module in modules:
        module._amrpa_state = state
        module.register_forward_pre_hook(_enter_attention, with_kwargs=True)
    model._amrpa_state = state
    model._amrpa_config = config
    model.register_forward_pre_hook(_start_forward)
    _freeze(model, base_parameters, config)
    log.info("AMRPA on layers %s of %d (windows %s); %s trainable parameters added", targets, num_depths,
             [windows[t] for t in targets], f"{sum(p.numel() for p in amrpa_parameters(model)):,}")
    return model


def _start_forward(model: nn.Module, args) -> None:
    model._amrpa_state.reset()


def _enter_attention(module: nn.Module, args, kwargs) -> None:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    module._amrpa_state.enter(hidden)


def _check_model(model: nn.Module):
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "model_type"):
        raise AMRPAConfigError(f"inject_amrpa needs a Hugging Face transformers model; got {type(model).__name__} "
                               "(for TRM: arch.amrpa_window, the memory across its recursion)")
    if getattr(hf_config, "is_encoder_decoder", False):
        raise AMRPAConfigError(f"inject_amrpa supports encoders and decoders, not encoder-decoders like "
                               f"{hf_config.model_type} (its encoder, decoder and cross attention have patterns of "
                               "different shapes); inject into an encoder-only or decoder-only model")
    # transformers 5.23 renamed is_gradient_checkpointing; the GPU machine's 5.17 may know only the old name.
    checkpointing = getattr(type(model), "is_activation_checkpointing", None)
    name = "is_activation_checkpointing" if checkpointing is not None else "is_gradient_checkpointing"
    if getattr(model, name, False):
        raise AMRPAConfigError("inject_amrpa: gradient checkpointing recomputes layers out of order, which AMRPA's "
                               "memory cannot follow; turn it off (arch.gradient_checkpointing=false)")
    return hf_config


def attention_modules(model: nn.Module, hf_config) -> tuple[list[nn.Module], int, callable]:
    """(the distinct self-attention modules in call order, attention calls per forward, depth -> module).

    A self-attention module is one that calls transformers' attention interface: a class named *Attention holding
    the model config and a `scaling`, not a cross attention."""
    modules = [m for m in model.modules()
               if "Attention" in type(m).__name__ and "Cross" not in type(m).__name__ and hasattr(m, "scaling")
               and hasattr(m, "config") and not getattr(m, "is_cross_attention", False)]
    if not modules:
        raise AMRPAConfigError(f"inject_amrpa: no self-attention module that calls transformers' attention interface "
                               f"in {type(model).__name__} ({hf_config.model_type})")
    if hf_config.model_type == "albert":  # one shared layer, called num_hidden_layers times
        if hf_config.num_hidden_groups != 1 or hf_config.inner_group_num != 1 or len(modules) != 1:
            raise AMRPAConfigError("inject_amrpa supports ALBERT with one shared layer (num_hidden_groups=1, "
                                   "inner_group_num=1)")
        return modules, hf_config.num_hidden_layers, lambda depth: modules[0]
    return modules, len(modules), lambda depth: modules[depth]


def _targets_and_windows(config: AMRPAConfig, num_depths: int) -> tuple[list[int], dict[int, int]]:
    targets = resolve_layers(config.target_layers, num_depths)
    windows = {}
    for depth in targets:
        if config.adaptive_window:
            windows[depth] = min(config.max_window_size, depth)
        elif depth < config.max_window_size:
            raise AMRPAConfigError(f"AMRPA: layer {depth} has {depth} earlier layers, fewer than the fixed window of "
                                   f"{config.max_window_size}; set adaptive_window=true, a smaller max_window_size, or "
                                   "target later layers", "target_layers")
        else:
            windows[depth] = config.max_window_size
    if 0 in targets:
        log.warning("AMRPA: layer 0 has no earlier layer to remember; it stays as it is")
        targets.remove(0)
    if not targets:
        raise AMRPAConfigError("AMRPA target_layers selects only layer 0, which has no earlier layer to remember; "
                               "target later layers", "target_layers")
    return targets, windows


def _hidden_and_heads(hf_config) -> tuple[int, int]:
    return int(hf_config.hidden_size), int(hf_config.num_attention_heads)


def _freeze(model: nn.Module, base_parameters: list[nn.Parameter], config: AMRPAConfig) -> None:
    if config.freeze_base_model:
        for p in base_parameters:
            p.requires_grad_(False)
    if config.freeze_embeddings and hasattr(model, "get_input_embeddings") and model.get_input_embeddings():
        model.get_input_embeddings().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------ reading

def amrpa_memories(model: nn.Module) -> list[tuple[int, AMRPAMemory]]:
    """(depth, memory) of every targeted layer, by depth."""
    found = [(int(depth), memory) for module in model.modules() if isinstance(getattr(module, "amrpa", None),
                                                                              nn.ModuleDict)
             for depth, memory in module.amrpa.items()]
    return sorted(found, key=lambda item: item[0])


def amrpa_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, memory in amrpa_memories(model) for p in memory.parameters()]


def get_amrpa_metrics(model: nn.Module) -> dict[str, torch.Tensor]:
    """One value per targeted layer (ordered as `layers`) from the model's last forward: gate_mean (the gate, 0 =
    closed), gate_impact (half the L1 distance between the attention used and the layer's own: how much the memory
    moved it), alpha_diversity (entropy of the selection over the remembered layers / log W: 1 = even, 0 = one
    layer), memory_similarity (cosine of the layer's pattern and the mixed memory), gate_strength (the learned
    per-head strength, mean), plus `layers` and `window`. NaN for a layer that has not run since a reset."""
    memories = amrpa_memories(model)
    if not memories:
        raise AMRPAConfigError("get_amrpa_metrics: this model has no AMRPA layers (inject_amrpa first)")
    nan = torch.tensor(float("nan"))
    out = {name: torch.stack([memory.last_metrics.get(name, nan).detach().float().cpu() for _, memory in memories])
           for name in METRIC_NAMES}
    out["layers"] = torch.tensor([depth for depth, _ in memories])
    out["window"] = torch.tensor([memory.window for _, memory in memories])
    return out


def reset_amrpa_history(model: nn.Module) -> None:
    """Forget the last forward: remembered patterns, metrics and pending regularisers (every forward also starts
    with an empty history; this frees the memory between batches and makes metrics start fresh)."""
    state = getattr(model, "_amrpa_state", None)
    if state is not None:
        state.reset()
    for module in model.modules():
        if isinstance(module, AMRPAMemory):
            module.last_metrics = {}
            module.pending_losses = []
        if getattr(module, "_amrpa_state", None) is not None:
            module._amrpa_state.reset()


def amrpa_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The regularisers of the last training forward (gradients on), weighted by the config and averaged over the
    targeted layers: diversity_weight * (1 - alpha_diversity) + gate_reg_weight * gate_mean. None when there is none
    pending; each call takes them (the next returns None until another forward)."""
    config = _config_of(model)
    pending = [loss for _, memory in amrpa_memories(model) for loss in memory.pending_losses]
    for _, memory in amrpa_memories(model):
        memory.pending_losses = []
    if not pending:
        return None
    diversity = torch.stack([d for d, _ in pending]).mean()
    gate = torch.stack([g for _, g in pending]).mean()
    return config.diversity_weight * diversity + config.gate_reg_weight * gate


def _config_of(model: nn.Module) -> AMRPAConfig:
    for module in model.modules():  # the injected root may sit inside a wrapper (a classifier, DDP)
        config = getattr(module, "_amrpa_config", None)
        if config is not None:
            return config
    raise AMRPAConfigError("this model has no AMRPA (inject_amrpa first)")


# ------------------------------------------------------------------------------------------------------ saving

def amrpa_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The AMRPA weights alone, under their names in the model's state dict."""
    return {name: tensor for name, tensor in model.state_dict().items() if ".amrpa." in f".{name}"}


def save_amrpa(model: nn.Module, folder: str | Path) -> Path:
    """Write <folder>/amrpa_config.json and <folder>/amrpa_model.safetensors (the AMRPA weights). With the base's
    own save_pretrained in the same folder, `load_amrpa(AutoModel.from_pretrained(folder), folder)` restores it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = _config_of(model)
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    save_file({k: v.detach().contiguous().cpu() for k, v in amrpa_state_dict(model).items()}, folder / WEIGHTS_FILE)
    return folder


def load_amrpa(model: nn.Module, folder: str | Path) -> nn.Module:
    """Inject AMRPA as saved in `folder` (save_amrpa) into `model` and load its weights; one line if they do not fit."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = AMRPAConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
        weights = load_file(folder / WEIGHTS_FILE)
    except (OSError, ValueError) as error:
        raise AMRPAConfigError(f"load_amrpa: cannot read AMRPA from {folder}: {error}") from None
    inject_amrpa(model, config)
    expected = set(amrpa_state_dict(model))
    if set(weights) != expected:
        extra = sorted(set(weights) ^ expected)
        raise AMRPAConfigError(f"load_amrpa: the weights in {folder} do not fit this model (e.g. {extra[0]!r}); load "
                               "them into the model they were saved from")
    model.load_state_dict(weights, strict=False)
    return model
