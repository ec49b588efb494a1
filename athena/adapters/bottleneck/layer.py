"""Bottleneck adapter (Houlsby / Pfeiffer style) for the output of an FFN block.

    h -> h + gate * up(dropout(act(down(h))))

`up` starts at zero, so a fresh adapter is the identity. With gating, a learned per-feature gate
sigmoid(g) (g = 0 at init, so 0.5) scales the residual branch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATION_FNS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh, "identity": lambda x: x}


class BottleneckAdapter(nn.Module):
    def __init__(self, features: int, bottleneck_size: int = 64, activation: str = "gelu", dropout: float = 0.0,
                 gating: bool = False, device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATION_FNS:
            from athena.adapters.config import AdapterConfigError

            raise AdapterConfigError(
                f"bottleneck_activation={activation!r} is unknown; use one of {', '.join(ACTIVATION_FNS)}")
        self.features, self.bottleneck_size, self.activation = features, bottleneck_size, activation
        kw = dict(device=device, dtype=dtype)
        self.down = nn.Linear(features, bottleneck_size, **kw)
        self.up = nn.Linear(bottleneck_size, features, **kw)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.gate = nn.Parameter(torch.zeros(features, **kw)) if gating else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.down.weight.dtype)
        delta = self.up(self.dropout(ACTIVATION_FNS[self.activation](self.down(x))))
        if self.gate is not None:
            delta = delta * torch.sigmoid(self.gate)
        return h + delta.to(h.dtype)

    def extra_repr(self) -> str:
        return f"{self.features} -> {self.bottleneck_size} -> {self.features}, act={self.activation}, gated={self.gate is not None}"
