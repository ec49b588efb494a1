"""Where a Hugging Face causal LM keeps the parts the adaptive forward loop calls, by model family.

The loop (wrapper.py) runs the decoder layer by layer itself, so it needs the embedding, the rotary embedding, the
decoder layers and, inside a layer, the two norms, the q/k/v/o projections and the MLP. Llama, Mistral and Qwen2
name them alike (the loop attends causally over the whole sequence: Mistral's sliding window is not applied, so it
matches Mistral up to its window length); another layout (GPT-2's fused c_attn, learned positions, post-LN models) gets a row here."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from athena.adaptive.config import AdaptiveConfigError

LLAMA_LAYOUT_TYPES = ("llama", "mistral", "qwen2")  # pre-norm, RoPE, SwiGLU MLP, separate q/k/v/o projections


@dataclass
class DecoderParts:
    embed: nn.Module
    rotary: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module


def decoder_parts(model: nn.Module) -> DecoderParts:
    """The parts of a Llama-layout causal LM; one line naming what is supported for anything else."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", type(model).__name__)
    if kind not in LLAMA_LAYOUT_TYPES:
        raise AdaptiveConfigError(
            f"HierarchicalAdaptiveWrapper runs Llama-layout decoders ({', '.join(LLAMA_LAYOUT_TYPES)}); this model is "
            f"{kind!r}: add its layout to athena/adaptive/layout.py")
    decoder = model.model
    return DecoderParts(embed=decoder.embed_tokens, rotary=decoder.rotary_emb, layers=decoder.layers,
                        norm=decoder.norm, lm_head=model.lm_head)
