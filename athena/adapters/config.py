"""AdapterConfig: one dataclass for every adapter method, validated on construction.

Any bad value raises AdapterConfigError with one line naming the field and how to fix it, so a Hydra run
(or a plain-Python user) sees the problem before any module is touched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from athena.errors import AthenaError

METHODS = ("lora", "ia3", "moe", "poly", "hybrid")
ACTIVATIONS = ("gelu", "relu", "silu", "tanh", "identity")

# Which parts each method switches on when use_lora / use_ia3 / use_moe are left at None.
_IMPLIED = {
    "lora": dict(use_lora=True, use_ia3=False, use_moe=False),
    "ia3": dict(use_lora=False, use_ia3=True, use_moe=False),
    "moe": dict(use_lora=False, use_ia3=False, use_moe=True),
    "poly": dict(use_lora=True, use_ia3=True, use_moe=True),
    "hybrid": dict(use_lora=True, use_ia3=False, use_moe=False),  # the parts put on apply_lora_to targets
}


class AdapterConfigError(AthenaError, ValueError):
    """A bad adapter configuration; the message names the field and the fix in one line."""


@dataclass
class AdapterConfig:
    method: str = "lora"  # lora | ia3 | moe | poly | hybrid
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False  # scaling alpha/sqrt(rank) instead of alpha/rank
    use_lora: bool | None = None  # None = implied by method
    use_ia3: bool | None = None
    use_moe: bool | None = None
    ia3_recompute: bool = False  # recompute base(x) in backward instead of saving it for IA3's gradient
    num_experts: int = 4
    top_k: int = 2
    expert_rank: int | None = None  # None -> the module's LoRA rank
    router_aux_weight: float = 0.01
    router_z_weight: float = 0.001
    target_modules: list[str] | None = None  # names (suffix of the module path) or regexes; None -> family defaults
    apply_lora_to: list[str] | None = None  # hybrid: modules that get LoRA; None -> attention projections
    bottleneck_size: int = 64
    bottleneck_activation: str = "gelu"
    bottleneck_dropout: float = 0.0
    bottleneck_gating: bool = False
    share_across_layers: bool = False  # hybrid: one bottleneck adapter per output width, shared by all layers
    rank_pattern: dict[str, int] = field(default_factory=dict)  # pattern -> rank override
    layers_to_skip: list[int] = field(default_factory=list)  # first integer in the module path
    freeze_base: bool = True

    def __post_init__(self):
        # Accept tuples / OmegaConf containers converted to plain python, and normalise them.
        if self.target_modules is not None:
            self.target_modules = [str(t) for t in _as_list(self.target_modules, "target_modules")]
        if self.apply_lora_to is not None:
            self.apply_lora_to = [str(t) for t in _as_list(self.apply_lora_to, "apply_lora_to")]
        self.layers_to_skip = list(_as_list(self.layers_to_skip, "layers_to_skip"))
        self.rank_pattern = dict(self.rank_pattern or {})
        self.validate()

    # ---- the parts actually switched on ----
    @property
    def lora_on(self) -> bool:
        return self._resolved("use_lora")

    @property
    def ia3_on(self) -> bool:
        return self._resolved("use_ia3")

    @property
    def moe_on(self) -> bool:
        return self._resolved("use_moe")

    def _resolved(self, name: str) -> bool:
        value = getattr(self, name)
        return _IMPLIED[self.method][name] if value is None else bool(value)

    def rank_for(self, module_name: str) -> int:
        """The LoRA rank of one module: the first matching rank_pattern entry, else `rank`."""
        from athena.adapters.targets import matches  # local import: targets.py imports this file

        for pattern, r in self.rank_pattern.items():
            if matches(pattern, module_name):
                return int(r)
        return self.rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AdapterConfigError(
                f"adapter config: unknown field(s) {unknown}; valid fields are {sorted(known)}"
            )
        return cls(**d)

    def validate(self) -> None:
        """Raise AdapterConfigError for the first bad field."""
        def fail(msg: str):
            raise AdapterConfigError(f"adapter config: {msg}")

        if self.method not in METHODS:
            fail(f"method={self.method!r} is unknown; use one of {', '.join(METHODS)}")
        for name in ("rank", "num_experts", "top_k", "bottleneck_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                fail(f"{name} must be an integer, got {v!r}")
        if self.rank < 0:
            fail(f"rank={self.rank} is negative; use a rank >= 1 (e.g. rank=8)")
        if self.lora_on and self.rank == 0:
            fail(f"rank=0 with LoRA on (method={self.method!r}); use rank >= 1 or set use_lora=False")
        if not self.alpha > 0:
            fail(f"alpha={self.alpha} must be > 0 (LoRA scaling is alpha/rank); e.g. alpha=16")
        for name in ("dropout", "bottleneck_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                fail(f"{name}={v} must be in [0, 1)")
        if self.method != "hybrid" and not (self.lora_on or self.ia3_on or self.moe_on):
            fail(f"method={self.method!r} with use_lora, use_ia3 and use_moe all False adds nothing; turn one on")
        if self.moe_on:
            if self.num_experts < 1:
                fail(f"num_experts={self.num_experts} must be >= 1 when experts are on")
            if not 1 <= self.top_k <= self.num_experts:
                fail(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]; lower top_k or add experts")
            er = self.rank if self.expert_rank is None else self.expert_rank
            if isinstance(er, bool) or not isinstance(er, int) or er < 1:
                fail(f"expert_rank={self.expert_rank!r} (rank={self.rank}) must be an integer >= 1 when experts are on")
            if self.router_aux_weight < 0 or self.router_z_weight < 0:
                fail(f"router_aux_weight={self.router_aux_weight} and router_z_weight={self.router_z_weight} must be >= 0")
        if self.method == "hybrid":
            if self.bottleneck_size < 1:
                fail(f"bottleneck_size={self.bottleneck_size} must be >= 1")
            if self.bottleneck_activation not in ACTIVATIONS:
                fail(f"bottleneck_activation={self.bottleneck_activation!r} is unknown; use one of {', '.join(ACTIVATIONS)}")
        elif self.bottleneck_activation not in ACTIVATIONS:
            fail(f"bottleneck_activation={self.bottleneck_activation!r} is unknown; use one of {', '.join(ACTIVATIONS)}")
        for pattern, r in self.rank_pattern.items():
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                fail(f"rank_pattern[{pattern!r}]={r!r} must be an integer >= 1")
        for i in self.layers_to_skip:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                fail(f"layers_to_skip entry {i!r} must be a layer index >= 0")
        if self.target_modules is not None and len(self.target_modules) == 0:
            fail("target_modules=[] selects nothing; give module names/regexes or leave it unset for the defaults")


def _as_list(value, name: str) -> list:
    if isinstance(value, str):
        return [value]  # a single name is a one-item list, not a list of characters
    try:
        return list(value)
    except TypeError:
        raise AdapterConfigError(f"adapter config: {name} must be a list, got {value!r}") from None
