"""Which layers get adapters: per-family default targets, the one matching rule, the warning when defaults
leave some of a block's linear layers bare, and each layer's LoRA rank (rank_pattern).

A pattern selects a module when it matches, as a regex, the whole module path or a dot-separated suffix of it
(`matches`): a plain name like "q_proj" or "attn.o_proj" selects every module whose path ends with it, and
"net\\.layers\\.0\\..*" style regexes work too.

The family of a model is read from its module names, not its `model_type`: the family whose default targets
cover the most of its linear layers (ties: the first in FAMILIES). So a model type that reuses a family's names
(Qwen2 and Mistral are llama-style, CLIP and Whisper BART-style) needs no entry, and a renamed layout (ViT in
transformers 5 uses q_proj/o_proj and mlp.fc1/fc2) is not mistaken for a neighbour with some of the same names.
"""

from __future__ import annotations

import re
import warnings

from torch import nn

from athena.adapters.base import adapter_layers
from athena.adapters.config import AdapterConfig, AdapterConfigError
from athena.adapters.linear import is_wrappable

# Per family: every adapted linear (`targets`), the attention projections (hybrid's LoRA) and the FFN output
# (hybrid's bottleneck). BERT's FFN output "output.dense" must not catch "attention.output.dense".
# TRM-MLP mixes tokens with a sequence MLP instead of attention; hybrid's LoRA goes there in its place.
FAMILIES = {
    "trm": dict(
        targets=["attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj",
                 "seq_mlp.gate_up_proj", "seq_mlp.down_proj"],
        attention=["attn.qkv_proj", "attn.o_proj", "seq_mlp.gate_up_proj", "seq_mlp.down_proj"],
        ffn_out=[r"layers\.\d+\.mlp\.down_proj"],
    ),
    "llama": dict(  # also Mistral, Qwen2/3, Gemma, OLMo
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        attention=["q_proj", "k_proj", "v_proj", "o_proj"],
        ffn_out=["mlp.down_proj"],
    ),
    "phi3": dict(  # llama-like, with fused q/k/v and gate/up projections
        targets=["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"],
        attention=["self_attn.qkv_proj", "self_attn.o_proj"],
        ffn_out=["mlp.down_proj"],
    ),
    "gpt2": dict(
        targets=["c_attn", "c_proj", "c_fc"],
        attention=["attn.c_attn", "attn.c_proj"],
        ffn_out=["mlp.c_proj"],
    ),
    "gpt_neox": dict(  # also Pythia
        targets=["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
        attention=["attention.query_key_value", "attention.dense"],
        ffn_out=["mlp.dense_4h_to_h"],
    ),
    "bert": dict(  # also RoBERTa, ELECTRA, and ViT before transformers 5
        targets=["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
        attention=["query", "key", "value", "attention.output.dense"],
        ffn_out=[r"(?<!attention\.)output\.dense"],
    ),
    "t5": dict(  # wi, or wi_0 and wi_1 in the gated FFN (T5 v1.1, Flan-T5)
        targets=[r"(SelfAttention|EncDecAttention)\.[qkvo]", r"DenseReluDense\.(wi|wi_0|wi_1|wo)"],
        attention=[r"(SelfAttention|EncDecAttention)\.[qkvo]"],
        ffn_out=[r"DenseReluDense\.wo"],
    ),
    "bart": dict(  # also mBART, Marian, Pegasus, Whisper, CLIP (its FFN is mlp.fc1/fc2)
        targets=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        attention=["q_proj", "k_proj", "v_proj", "out_proj"],
        ffn_out=["fc2"],
    ),
    "vit": dict(  # transformers 5 layout: attention.{q,k,v,o}_proj, mlp.fc1/fc2
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
        attention=["q_proj", "k_proj", "v_proj", "o_proj"],
        ffn_out=["fc2"],
    ),
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


def base_layer_paths(model: nn.Module) -> list[str]:
    """Paths of the linear layers adapters can wrap: not existing adapters' own parts (lora_A, router, ...)."""
    parts = adapter_part_ids(model)
    return [n for n, m in model.named_modules()
            if n and is_wrappable(m) and id(m) not in parts and not n.endswith("base_layer")]


def adapter_part_ids(model: nn.Module) -> set[int]:
    """ids of the modules that belong to adapters (LoRA A/B, router, bottleneck layers), not to the base."""
    return {id(sub) for layer in adapter_layers(model) for sub in layer.adapter_modules()}


def rank_for(config: AdapterConfig, module_name: str) -> int:
    """The LoRA rank of one module: the first matching rank_pattern entry, else `config.rank`; 0 means the module
    gets no adapter (add_adapters leaves it out)."""
    for pattern, rank in config.rank_pattern.items():
        if matches(pattern, module_name):
            return int(rank)
    return config.rank


def detect_family(model: nn.Module, paths: list[str] | None = None) -> str | None:
    """The family whose default targets select the most of the model's linear layers; None if none selects any."""
    paths = base_layer_paths(model) if paths is None else paths
    best, best_hits = None, 0
    for family, defaults in FAMILIES.items():
        hits = sum(any(matches(p, n) for p in defaults["targets"]) for n in paths)
        if hits > best_hits:
            best, best_hits = family, hits
    return best


def block_kinds(paths: list[str]) -> list[str]:
    """The kinds of linear layer inside the model's numbered blocks, named by their path after the last index
    (`model.layers.3.self_attn.q_proj` -> `self_attn.q_proj`); layers outside blocks (lm_head) are not kinds."""
    kinds = []
    for n in paths:
        parts = n.split(".")
        last = max((i for i, p in enumerate(parts) if p.isdigit()), default=None)
        if last is not None and last < len(parts) - 1:
            kind = ".".join(parts[last + 1:])
            if kind not in kinds:
                kinds.append(kind)
    return kinds


def select_modules(model: nn.Module, patterns: list[str] | None, config: AdapterConfig, field_name: str,
                   default_key: str) -> list[str]:
    """Paths of the wrappable layers selected by `patterns` (None -> family defaults), minus skipped layers.

    User-given patterns must each select at least one linear layer (catches typos); defaults may miss
    (the TRM list names both the attention and the MLP mixer). When the full default target list
    (default_key="targets") leaves some kind of block linear bare, a warning names those kinds.
    """
    candidates = base_layer_paths(model)
    user_given = patterns is not None
    family = None
    if user_given:
        patterns = list(patterns)
    else:
        family = detect_family(model, candidates)
        if family is None:
            raise AdapterConfigError(
                f"adapter config: cannot tell the model family of {type(model).__name__} to pick default targets; "
                f"set {field_name} (e.g. {field_name}=['q_proj','v_proj'])")
        patterns = FAMILIES[family][default_key]
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
    if family is not None and default_key == "targets":
        _warn_bare_kinds(model, family, candidates, chosen, field_name)
    skip = set(config.layers_to_skip)
    return [n for n in chosen if layer_index(n) not in skip]


def _warn_bare_kinds(model: nn.Module, family: str, candidates: list[str], chosen: list[str], field_name: str):
    chosen_kinds = set(block_kinds(chosen))
    bare = [k for k in block_kinds(candidates) if k not in chosen_kinds]
    if bare:
        warnings.warn(
            f"{type(model).__name__}: the default targets ({family}-style names) leave {len(bare)} kind(s) of "
            f"linear layer in its blocks without adapters: {bare}; name every layer you want adapted in "
            f"{field_name} (this also silences the warning)", stacklevel=4)
