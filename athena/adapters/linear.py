"""The linear layers an adapter can wrap, and how to read their shape: torch's nn.Linear, athena's Linear,
transformers' Conv1D (GPT-2; weight stored (in, out)) and Int8Linear.

Int8Linear lives here rather than in quantize.py: it is one of the layers adapters wrap (base_dims must know it)
and it is built from any of them (from_layer needs base_dims), while quantize_adapter_model, which swaps it into a
model, needs the injection code that sits above the adapter layers.

Int8Linear: a frozen linear layer with int8 weights, one float scale per output feature.
    W ~= q * s,  q = round(W / s) in [-127, 127],  s = max|W_row| / 127
    y  = (x @ q^T) * s + b      (the scale is applied after the matmul: no dequantised weight is stored)
Plain PyTorch, so it runs anywhere torch does (CPU and GPU); it saves memory, not time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from athena.models.trm.layers import Linear as AthenaLinear


def base_dims(layer: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a supported linear layer; TypeError for any other module.

    fan_in_fan_out: the weight is stored (in, out), as in HF GPT-2's Conv1D, instead of torch's (out, in).
    """
    if isinstance(layer, (nn.Linear, AthenaLinear, Int8Linear)):
        return layer.in_features, layer.out_features, False
    name = type(layer).__name__
    if name == "Conv1D" and hasattr(layer, "nf"):  # transformers.pytorch_utils.Conv1D, named to not import transformers
        return layer.weight.shape[0], layer.weight.shape[1], True
    raise TypeError(f"cannot wrap {name}: supported are nn.Linear, athena Linear and transformers Conv1D")


def is_wrappable(module: nn.Module) -> bool:
    try:
        base_dims(module)
        return True
    except TypeError:
        return False


class Int8Linear(nn.Module):
    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight", weight_int8)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) float32
        self.register_buffer("bias", bias)  # (out,) or None, kept in float

    @classmethod
    def from_layer(cls, layer: nn.Module) -> Int8Linear:
        _, _, fan_in_fan_out = base_dims(layer)
        w = layer.weight.detach().float()
        w = w.T if fan_in_fan_out else w  # Conv1D stores (in, out)
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        bias = getattr(layer, "bias", None)
        return cls(q.contiguous(), scale, None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scale[:, None]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel, bias={self.bias is not None}"
