"""quantize_adapter_model: an int8 weight-only base under the adapters (linear.Int8Linear), adapters kept in
16 or 32 bit. It saves memory, not time."""

from __future__ import annotations

import torch
from torch import nn

from athena.adapters.base import adapter_layers, adapter_parameters, has_adapters
from athena.adapters.config import AdapterConfigError
from athena.adapters.inject import set_module
from athena.adapters.linear import Int8Linear, is_wrappable
from athena.adapters.targets import adapter_part_ids


def quantize_adapter_model(model: nn.Module, bits: int = 8, adapter_bits: int = 16) -> nn.Module:
    """Replace every frozen base linear (wrapped or not) by an Int8Linear; cast adapters to adapter_bits.

    adapter_bits=16 -> bfloat16 adapters (fp16 is poorly supported on CPU), 32 -> float32. Trainable base
    layers (freeze_base=False) are left in full precision: int8 weights cannot be trained. Refused in one line
    (AdapterConfigError), rather than doing nothing: a model without adapters, a model with no frozen linear
    layer, merged adapters (unmerge first; the merged weights would be quantised into the base).
    """
    if bits != 8:
        raise AdapterConfigError(f"quantize_adapter_model: bits={bits} is not supported; use bits=8")
    if adapter_bits not in (16, 32):
        raise AdapterConfigError(f"quantize_adapter_model: adapter_bits={adapter_bits} must be 16 or 32")
    if not has_adapters(model):
        raise AdapterConfigError("quantize_adapter_model: this model has no adapters; add them with add_adapters "
                                 "first (it quantises the frozen base under the adapters)")
    if any(layer.merged for layer in adapter_layers(model)):
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
