"""Int8 weight-only base: per-output-channel symmetric int8 weights, adapters kept in 16 or 32 bit.

    W ~= q * s,  q = round(W / s) in [-127, 127],  s = max|W_row| / 127   (one scale per output feature)
    y  = (x @ q^T) * s + b      (the scale is applied after the matmul: no dequantised weight is stored)

Plain PyTorch, so it runs anywhere torch does (CPU and GPU); it saves memory, not time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from athena.adapters.config import AdapterConfigError


class Int8Linear(nn.Module):
    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight", weight_int8)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) float32
        self.register_buffer("bias", bias)  # (out,) or None, kept in float

    @classmethod
    def from_layer(cls, layer: nn.Module) -> "Int8Linear":
        from athena.adapters.poly.layer import base_dims

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


def quantize_adapter_model(model: nn.Module, bits: int = 8, adapter_bits: int = 16) -> nn.Module:
    """Replace every frozen base linear (wrapped or not) by an Int8Linear; cast adapters to adapter_bits.

    adapter_bits=16 -> bfloat16 adapters (fp16 is poorly supported on CPU), 32 -> float32. Trainable base
    layers (freeze_base=False) are left in full precision: int8 weights cannot be trained. Refused in one line
    (AdapterConfigError), rather than doing nothing: a model without adapters, a model with no frozen linear
    layer, merged adapters (unmerge first; the merged weights would be quantised into the base).
    """
    from athena.adapters.model import adapter_parameters, is_adapter_module, set_module
    from athena.adapters.poly.layer import PolyAdapter
    from athena.adapters.targets import adapter_part_ids, is_wrappable

    if bits != 8:
        raise AdapterConfigError(f"quantize_adapter_model: bits={bits} is not supported; use bits=8")
    if adapter_bits not in (16, 32):
        raise AdapterConfigError(f"quantize_adapter_model: adapter_bits={adapter_bits} must be 16 or 32")
    if not any(is_adapter_module(m) for m in model.modules()):
        raise AdapterConfigError("quantize_adapter_model: this model has no adapters; add them with add_adapters "
                                 "first (it quantises the frozen base under the adapters)")
    if any(isinstance(m, PolyAdapter) and m.merged for m in model.modules()):
        raise AdapterConfigError("quantize_adapter_model: adapters are merged; call unmerge_adapters first")
    parts = adapter_part_ids(model)
    names = [n for n, m in model.named_modules()
             if n and is_wrappable(m) and not isinstance(m, Int8Linear) and id(m) not in parts
             and not any(p.requires_grad for p in m.parameters())]
    if not names and not any(isinstance(m, Int8Linear) for m in model.modules()):
        raise AdapterConfigError("quantize_adapter_model: no frozen linear layer to quantise (the base trains: int8 "
                                 "weights cannot); add the adapters with freeze_base=True")
    for name in names:
        set_module(model, name, Int8Linear.from_layer(model.get_submodule(name)))
    dtype = torch.bfloat16 if adapter_bits == 16 else torch.float32
    for p in adapter_parameters(model):
        p.data = p.data.to(dtype)
    return model
