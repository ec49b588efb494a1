"""ExitConfig: the knobs of exit gates + capacity routers, their defaults and rules (the `exit` group's schema).

Plain pydantic, no torch: athena.config validates `exit:` against it before any compute, and
HierarchicalAdaptiveWrapper takes its defaults from here (a default is written once).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from athena.errors import AthenaError

# The published setting: gates after layers 4, 8, 12, 16 and 19 of TinyLlama's 22, scaled to other depths.
REFERENCE_EXITS, REFERENCE_DEPTH = (4, 8, 12, 16, 19), 22

Phase = Literal["routers", "exit", "full"]
Routing = Literal["topk", "causal"]


class AdaptiveConfigError(AthenaError, ValueError):
    """A bad adaptive-computation setting or an unsupported base model; the message says how to fix it."""


class ExitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: Literal["none", "hierarchical"] = "hierarchical"
    # Layers after which a gate may stop a token (1-based: 4 = after the 4th decoder layer); null: five spread
    # like 4/8/12/16/19 of 22 over the model's depth; [] no exits.
    exit_layers: list[int] | None = None
    capacity: float = Field(default=0.55, gt=0, le=1)  # share of active tokens each layer's FFN runs on
    routing: Routing = "topk"  # topk: exactly round(c x active) per sequence; causal: per-token threshold (decoding)
    phase: Phase = "full"  # routers: routers train, no exits; exit: gates train over fixed routers; full: both
    tau_forward: float = Field(default=1.0, ge=0)  # scale of the Gumbel noise on a gate's forward decision (0: none)
    tau_backward: float = Field(default=1.0, gt=0)  # temperature of the sigmoid the gate's gradient flows through
    gate_bias_init: float = -3.0  # a fresh gate exits ~5% of tokens under noise and none in eval
    z_loss_weight: float = Field(default=1e-3, ge=0)  # ST-MoE router z-loss
    entropy_weight: float = Field(default=1e-3, ge=0)  # > 0 sharpens router decisions (a threshold then matches top-k)
    exit_cost_weight: float = Field(default=0.05, ge=0)  # price of depth: mean share of layers a token runs
    threshold_momentum: float = Field(default=0.99, ge=0, lt=1)  # EMA of the top-k score threshold (causal mode)
    freeze_base: bool = True  # only gates and routers train

    @model_validator(mode="after")
    def _layers_positive(self) -> ExitConfig:
        if self.exit_layers is not None and any(layer < 1 for layer in self.exit_layers):
            raise ValueError(f"exit_layers counts decoder layers from 1 (a gate after that layer), got "
                             f"{self.exit_layers}")
        return self

    def wrapper_kwargs(self) -> dict:
        """The keyword arguments of HierarchicalAdaptiveWrapper."""
        return self.model_dump(exclude={"name"})


def default_exit_layers(depth: int) -> list[int]:
    """Five gates spread like 4/8/12/16/19 of 22 over `depth` layers (rounded, deduplicated, never after the last
    layer, where exiting saves nothing)."""
    scaled = sorted({int(layer * depth / REFERENCE_DEPTH + 0.5) for layer in REFERENCE_EXITS})
    return [layer for layer in scaled if 1 <= layer < depth]


def check_exit_layers(exit_layers: list[int], depth: int) -> list[int]:
    bad = [layer for layer in exit_layers if not 1 <= layer < depth]
    if bad:
        raise AdaptiveConfigError(f"exit_layers {bad} out of range: a gate sits after decoder layer 1..{depth - 1} "
                                  f"of this {depth}-layer model")
    return sorted(set(exit_layers))
