"""Bottleneck adapter (Houlsby / Pfeiffer style) for the output of an FFN block, and the wrapper that runs it
after the wrapped layer.

    h -> h + gate * up(dropout(act(down(h))))

`up` starts at zero, so a fresh adapter is the identity. With gating, a learned per-feature gate
sigmoid(g) (g = 0 at init, so 0.5) scales the residual branch. One BottleneckAdapter may be shared by many
wrappers (hybrid's share_across_layers): its parameters then appear, and are counted and optimised, once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from athena.adapters.base import AdapterLayer
from athena.adapters.config import ACTIVATIONS, AdapterConfig, AdapterConfigError

ACTIVATION_FNS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh, "identity": lambda x: x}
assert set(ACTIVATION_FNS) == set(ACTIVATIONS), "every activation the schema accepts needs a function"


class BottleneckAdapter(nn.Module):
    def __init__(self, features: int, bottleneck_size: int = AdapterConfig.bottleneck_size,
                 activation: str = AdapterConfig.bottleneck_activation,
                 dropout: float = AdapterConfig.bottleneck_dropout, gating: bool = AdapterConfig.bottleneck_gating,
                 device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATION_FNS:
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


class BottleneckWrapper(AdapterLayer):
    """Runs the wrapped FFN output layer, then the (possibly shared) bottleneck adapter on its output."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter):
        super().__init__(base_layer)
        self.adapter = adapter
        self.follow_base_layer_mode()  # no bottleneck dropout around an eval-mode layer

    @property
    def part_names(self) -> tuple[str, ...]:
        return ("bottleneck",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base_layer(x))

    def unmergeable(self) -> tuple[str, nn.Module]:
        return "bottlenecks", self.adapter  # it depends on the base output, so it cannot fold into a weight
