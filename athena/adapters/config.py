"""AdapterConfig: every adapter knob once, with its type, bounds and default; validated on construction.

This is the one schema. It is a pydantic dataclass so the same declarations serve both doors:
- plain Python: `AdapterConfig(rank=-1)` raises AdapterConfigError, one line naming the field;
- a Hydra run: athena.config.AdapterNode takes these fields as they are (so an error names `adapter.rank`),
  and conf/adapter_parts/*.yaml read their values from here (`${default:adapter.rank}`).
PolyAdapter, BottleneckAdapter and HybridAdapterConfig take their defaults from the class attributes
(`AdapterConfig.rank`), so a default is written nowhere else.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, StrictInt, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from athena.errors import AthenaError, one_line_construction

Method = Literal["lora", "ia3", "moe", "poly", "hybrid"]
Activation = Literal["gelu", "relu", "silu", "tanh", "identity"]
METHODS: tuple[str, ...] = get_args(Method)
ACTIVATIONS: tuple[str, ...] = get_args(Activation)

# Which parts each method switches on when use_lora / use_ia3 / use_moe are left at None.
_IMPLIED = {
    "lora": dict(use_lora=True, use_ia3=False, use_moe=False),
    "ia3": dict(use_lora=False, use_ia3=True, use_moe=False),
    "moe": dict(use_lora=False, use_ia3=False, use_moe=True),
    "poly": dict(use_lora=True, use_ia3=True, use_moe=True),
    "hybrid": dict(use_lora=True, use_ia3=False, use_moe=False),  # the parts put on apply_lora_to targets
}


def _as_list(value) -> list:
    if isinstance(value, str):
        return [value]  # a single name is a one-item list, not a list of characters
    try:
        return list(value)
    except TypeError:
        raise ValueError("must be a list") from None


def _as_dict(value) -> dict:
    try:
        return dict(value or {})
    except (TypeError, ValueError):
        raise ValueError("must be a mapping of pattern -> rank") from None


def _names(value) -> list[str] | None:
    return None if value is None else [str(name) for name in _as_list(value)]


def _selects_something(value: list[str] | None) -> list[str] | None:
    if value == []:
        raise ValueError("selects nothing; give module names/regexes or leave it unset for the defaults")
    return value


# The field types carry their checks and the normalising of what callers pass (tuples, OmegaConf containers, a
# single name), so athena.config.AdapterNode, which takes these fields as they are, checks exactly the same.
# Integers are strict (8.0 or True is not a rank); floats accept integers (alpha: 16).
AtLeastOne = Annotated[StrictInt, Field(ge=1)]
Probability = Annotated[float, Field(ge=0, lt=1)]
ModuleNames = Annotated[list[str] | None, BeforeValidator(_names)]
LayerIndices = Annotated[list[Annotated[StrictInt, Field(ge=0)]], BeforeValidator(_as_list)]
# 0 = no adapter on the modules it matches (AutoRank's "skip this one"); peft has no rank 0, it leaves them out.
RankPattern = Annotated[dict[str, Annotated[StrictInt, Field(ge=0)]], BeforeValidator(_as_dict)]


class AdapterConfigError(AthenaError, ValueError):
    """A bad adapter configuration; the message names the field and the fix in one line.

    `field` (None when the problem spans fields) and `problem` (the message without the field) let a caller that
    names fields differently (athena.config.AdapterNode, HybridAdapterConfig) say it in its own words."""

    def __init__(self, message: str, field: str | None = None, problem: str | None = None):
        super().__init__(message)
        self.field, self.problem = field, problem if problem is not None else message


@one_line_construction(lambda error: _describe(error))  # _describe: defined below the class
@dataclass(config=ConfigDict(extra="forbid"))
class AdapterConfig:
    method: Method = "lora"
    rank: Annotated[StrictInt, Field(ge=0)] = 8  # LoRA rank; 0 only with LoRA off
    alpha: Annotated[float, Field(gt=0)] = 16.0  # LoRA scaling numerator: scaling = alpha / rank
    dropout: Probability = 0.0  # on the adapter input (LoRA and expert branches)
    use_rslora: bool = False  # scaling alpha/sqrt(rank) instead of alpha/rank
    use_lora: bool | None = None  # None = implied by method
    use_ia3: bool | None = None
    use_moe: bool | None = None
    ia3_recompute: bool = False  # recompute base(x) in backward instead of saving it for IA3's gradient
    num_experts: AtLeastOne = 4
    top_k: AtLeastOne = 2
    expert_rank: AtLeastOne | None = None  # None -> the module's LoRA rank
    router_aux_weight: Annotated[float, Field(ge=0)] = 0.01
    router_z_weight: Annotated[float, Field(ge=0)] = 0.001
    # names (suffix of the module path) or regexes; None -> the family's defaults
    target_modules: Annotated[ModuleNames, AfterValidator(_selects_something)] = None
    apply_lora_to: ModuleNames = None  # hybrid: modules that get LoRA; None -> attention projections, [] -> none
    bottleneck_size: AtLeastOne = 64
    bottleneck_activation: Activation = "gelu"
    bottleneck_dropout: Probability = 0.0
    bottleneck_gating: bool = False
    share_across_layers: bool = False  # hybrid: one bottleneck adapter per output width, shared by all layers
    rank_pattern: RankPattern = Field(default_factory=dict)  # pattern -> rank override; 0: leave that module bare
    layers_to_skip: LayerIndices = Field(default_factory=list)  # the first integer in a module's path
    freeze_base: bool = True

    @model_validator(mode="after")
    def _parts_fit_together(self) -> AdapterConfig:
        if self.lora_on and self.rank == 0:
            raise ValueError(f"rank=0 with LoRA on ({self.method}); use rank >= 1 or turn use_lora off")
        if self.method != "hybrid" and not (self.lora_on or self.ia3_on or self.moe_on):
            raise ValueError(f"{self.method} with use_lora, use_ia3 and use_moe all off adds nothing; turn one on")
        if self.moe_on and self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} is larger than num_experts={self.num_experts}; lower top_k or "
                             "add experts")
        if self.moe_on and self.expert_rank is None and self.rank == 0:
            raise ValueError("experts need a rank: set expert_rank >= 1 (or rank >= 1)")
        return self

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        unknown = sorted(set(d) - set(FIELD_NAMES))
        if unknown:
            raise AdapterConfigError(f"adapter config: unknown field(s) {unknown}; valid fields are {sorted(FIELD_NAMES)}")
        return cls(**d)


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(AdapterConfig))


def default_value(name: str) -> Any:
    """The default of one AdapterConfig field (a fresh list/dict for those built by a factory)."""
    if name not in FIELD_NAMES:
        raise AdapterConfigError(f"adapter config: no field {name!r}; valid fields are {sorted(FIELD_NAMES)}")
    return AdapterConfig.__pydantic_fields__[name].get_default(call_default_factory=True)


def _describe(error: ValidationError) -> AdapterConfigError:
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    problem = first["msg"].removeprefix("Value error, ")
    if first["type"] == "unexpected_keyword_argument":
        problem = f"unknown field; valid fields are {sorted(FIELD_NAMES)}"
    elif field is not None:
        problem = f"{problem} (got {first['input']!r})"
    return AdapterConfigError(f"adapter config: {field + ': ' if field else ''}{problem}", field, problem)

