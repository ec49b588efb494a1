"""AMRPAConfig: every knob of AMRPA (cross-layer attention memory) once, with its type, bounds and default.

A pydantic dataclass, as athena.adapters.AdapterConfig: `AMRPAConfig(memory_decay=2)` raises AMRPAConfigError, one
line naming the field; athena.config.MemoryNode takes these fields as they are (an error names `memory.<knob>`) and
conf/memory/amrpa.yaml reads their defaults from here (`${default:amrpa.memory_decay}`).

Target layers are given as a pattern, resolved against a model's number of attention layers by `resolve_layers`:
'last_4', 'first_3', 'middle_6', 'all', '6:10' (Python's half-open slice: layers 6, 7, 8, 9; '6:' and ':4' too),
or an explicit list of indices ([8, 9, 10, 11]; negative ones count from the end).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Any, Literal, get_args

from pydantic import BeforeValidator, ConfigDict, Field, StrictInt, ValidationError
from pydantic.dataclasses import dataclass

from athena.errors import ConfigError, one_line_construction

GateActivation = Literal["sigmoid", "hard_sigmoid", "tanh"]
GATE_ACTIVATIONS: tuple[str, ...] = get_args(GateActivation)
_PATTERN = re.compile(r"^(?:(?P<kind>last|first|middle)_(?P<count>\d+)|(?P<start>-?\d*):(?P<stop>-?\d*)|all)$")
PATTERN_HELP = "'last_N', 'first_N', 'middle_N', 'all', 'A:B' (half-open) or a list of layer indices"


class AMRPAConfigError(ConfigError):
    """A bad AMRPA configuration or a pattern that does not fit the model; one line naming the field and the fix.
    `field` and `problem` let athena.config say it as `memory.<field>`."""

    def __init__(self, message: str, field: str | None = None, problem: str | None = None):
        super().__init__(message)
        self.field, self.problem = field, problem if problem is not None else message


def _layer_pattern(value: Any) -> str | list[int]:
    if isinstance(value, str):
        if not _PATTERN.match(value.strip()):
            raise ValueError(f"unknown layer pattern {value!r}; use {PATTERN_HELP}")
        return value.strip()
    try:
        items = list(value)
    except TypeError:
        raise ValueError(f"must be {PATTERN_HELP}") from None
    if not items:
        raise ValueError("selects no layer; give at least one index")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ValueError(f"a list of layer indices must hold integers (got {items!r})")
    if len(set(items)) != len(items):
        raise ValueError(f"layer indices repeat in {items!r}")
    return items


LayerPattern = Annotated[str | list[int], BeforeValidator(_layer_pattern)]
UnitInterval = Annotated[float, Field(ge=0, le=1)]


@one_line_construction(lambda error: _describe(error))  # _describe: defined below the class
@dataclass(config=ConfigDict(extra="forbid"))
class AMRPAConfig:
    # The memory: each targeted layer remembers the attention patterns of up to max_window_size earlier layers.
    memory_decay: Annotated[float, Field(gt=0, le=1)] = 0.9  # weight gamma**distance of a layer `distance` back
    memory_noise: Annotated[float, Field(ge=0)] = 0.001  # std of the noise on remembered patterns (training only)
    adaptive_window: bool = True  # window of layer l = min(max_window_size, l); False: every layer needs the full one
    max_window_size: Annotated[StrictInt, Field(ge=1)] = 4
    # The gate: how much of the mixed memory replaces the layer's own pattern, from their similarity.
    gate_sensitivity: Annotated[float, Field(gt=0)] = 2.0  # slope of the gate in the cosine similarity
    gate_bias: float = -0.25  # initial (learned, per head) offset of the gate's pre-activation
    gate_activation: GateActivation = "sigmoid"
    # Learned per-head strength the gate is multiplied by, in [0, 1]; 0 (default) makes the injected model start
    # exactly as the original (the memory opens as the strength learns), 0 is also "gate closed".
    gate_init_strength: UnitInterval = 0.0
    # The selection MLP: softmax weights over the remembered layers, per head and position, from the hidden state.
    alpha_temperature: Annotated[float, Field(gt=0)] = 0.25
    alpha_mlp_hidden: Annotated[StrictInt, Field(ge=1)] = 384
    alpha_mlp_layers: Annotated[StrictInt, Field(ge=1)] = 2  # linear layers (1: a single linear map)
    target_layers: LayerPattern = "last_4"
    freeze_base_model: bool = True  # every parameter the model had before injection stops training
    freeze_embeddings: bool = True  # the input embeddings stop training (matters with freeze_base_model=False)
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.2  # inside the selection MLP
    # Regularisers, added to the training loss through amrpa_aux_loss (the loop's aux-loss seam).
    diversity_weight: Annotated[float, Field(ge=0)] = 0.005  # penalises selection weights that collapse on one layer
    gate_reg_weight: Annotated[float, Field(ge=0)] = 0.05  # penalises open gates: memory only where it pays

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AMRPAConfig:
        return cls(**d)


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(AMRPAConfig))


def _describe(error: ValidationError) -> AMRPAConfigError:
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"][:1]) or None
    problem = first["msg"].removeprefix("Value error, ")
    if first["type"] == "unexpected_keyword_argument":
        problem = f"unknown field; valid fields are {', '.join(FIELD_NAMES)}"
    elif field is not None and "got" not in problem:
        problem = f"{problem} (got {first['input']!r})"
    return AMRPAConfigError(f"AMRPA config: {field + ': ' if field else ''}{problem}", field, problem)


def resolve_layers(pattern: str | list[int], num_layers: int) -> list[int]:
    """The sorted layer indices a pattern selects in a model of `num_layers` attention layers; one-line
    AMRPAConfigError when the pattern does not fit (more layers than the model has, an index out of range)."""
    pattern = _checked(pattern)
    if isinstance(pattern, list):
        bad = [i for i in pattern if not -num_layers <= i < num_layers]
        if bad:
            raise AMRPAConfigError(f"AMRPA target_layers: index {bad[0]} is outside a model of {num_layers} layers "
                                   f"(valid: 0..{num_layers - 1} or -{num_layers}..-1)", "target_layers")
        layers = sorted(i % num_layers for i in pattern)
        if len(set(layers)) != len(layers):
            raise AMRPAConfigError(f"AMRPA target_layers: {pattern!r} names a layer twice", "target_layers")
        return layers
    match = _PATTERN.match(pattern)
    if pattern == "all":
        return list(range(num_layers))
    if match["kind"]:
        count = int(match["count"])
        if not 1 <= count <= num_layers:
            raise AMRPAConfigError(f"AMRPA target_layers: {pattern!r} needs 1..{num_layers} layers, this model has "
                                   f"{num_layers}", "target_layers")
        start = {"first": 0, "last": num_layers - count, "middle": (num_layers - count) // 2}[match["kind"]]
        return list(range(start, start + count))
    start = int(match["start"]) if match["start"] else None
    stop = int(match["stop"]) if match["stop"] else None
    layers = list(range(num_layers))[slice(start, stop)]
    if not layers:
        raise AMRPAConfigError(f"AMRPA target_layers: {pattern!r} selects no layer of a model with {num_layers} "
                               "layers", "target_layers")
    return layers


def _checked(pattern: Any) -> str | list[int]:
    try:
        return _layer_pattern(pattern)
    except ValueError as error:
        raise AMRPAConfigError(f"AMRPA target_layers: {error}", "target_layers") from None
