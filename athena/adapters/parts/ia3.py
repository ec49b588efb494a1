"""IA3: a learned per-feature scale on the base layer's OUTPUT (init ones, so a fresh adapter equals the base).

    out = base(x) * ia3_l

With ia3_recompute, training recomputes base(x) in backward for IA3's gradient instead of saving it: one
(tokens, out_features) tensor less per layer for one more base matmul in backward. It pays when x is saved
anyway (LoRA or experts on, as in poly) or the layer widens (in < out).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class IA3:
    name = "ia3"
    switch = "use_ia3"
    tensors = ("ia3_l",)
    mergeable = True

    @staticmethod
    def build(layer: nn.Module, **factory_kwargs) -> None:
        layer.ia3_l = nn.Parameter(torch.ones(layer.out_features, **factory_kwargs))

    @staticmethod
    def base_output(layer: nn.Module, x2: torch.Tensor) -> torch.Tensor:
        if layer.ia3_recompute and torch.is_grad_enabled():
            # checkpoint saves x2 (often saved by the LoRA/expert matmuls already) instead of base(x2).
            return checkpoint(IA3.scaled_base, layer, x2, use_reentrant=False, preserve_rng_state=False)
        return IA3.scaled_base(layer, x2)

    @staticmethod
    def scaled_base(layer: nn.Module, x2: torch.Tensor) -> torch.Tensor:
        out, scale = layer.base_layer(x2), layer.ia3_l
        return out * (scale if scale.dtype == out.dtype else scale.to(out.dtype))

    @staticmethod
    def merge(layer: nn.Module, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        """W' = diag(l) W, b' = l * b."""
        w *= layer.ia3_l.float()[:, None]
        if bias is not None:
            bias.copy_(bias.float() * layer.ia3_l.float())

    @staticmethod
    def unmerge(layer: nn.Module, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        w /= layer.ia3_l.float()[:, None]
        if bias is not None:
            bias.copy_(bias.float() / layer.ia3_l.float())

    @staticmethod
    def describe(layer: nn.Module) -> str:
        return "ia3"
