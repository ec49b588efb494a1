"""The schema of a whole run, checked before any compute.

Hydra composes `conf/` into one tree; `validate_config` turns it into a `RunConfig` and stops with
one line naming the offending key when a key is unknown, a value has the wrong type, or a value
is impossible (negative lr, zero cycles, ...). Every `_target_` node keeps its name as `target`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, create_model, model_validator

from athena.adapters.config import METHODS, AdapterConfig, AdapterConfigError
from athena.adaptive.config import ExitConfig
from athena.errors import AthenaError, ConfigError
from athena.memory.amrpa.config import AMRPAConfig, AMRPAConfigError
from athena.schema import Strict, TargetNode, describe
from athena.training.config import LoggerConfig, OptimizerConfig, TrainConfig
from athena.training.freezing_config import FreezingConfig
from athena.training.rehearsal_config import RehearsalConfig


class ArchNode(TargetNode):
    """conf/arch/*.yaml: `_target_` (the model class) + its hyperparameters, checked by the schema the model owns
    (ARCH_SCHEMAS) in validate_config, so each rule and default lives in one place."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())

    def hyperparameters(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


# The schema of each model class's hyperparameters (module:class, imported only when used).
ARCH_SCHEMAS = {"athena.models.trm.TinyRecursiveModel": "athena.models.trm.config:TRMConfig",
                "athena.models.hf.causal_lm": "athena.models.hf_config:HFCausalLMConfig"}
# The schemas whose defaults conf/ reads as `${default:<schema>.<knob>}`: a YAML file lists each knob (so `--cfg job`
# shows it and a command line overrides it without `+`) but its value is written once, in the schema.
SCHEMA_DEFAULTS = {"trm": "athena.models.trm.config:TRMConfig", "adapter": "athena.adapters.config:AdapterConfig",
                   "hf": "athena.models.hf_config:HFCausalLMConfig", "exit": "athena.adaptive.config:ExitConfig",
                   "freezing": "athena.training.freezing_config:FreezingKnobs",
                   "rehearsal": "athena.training.rehearsal_config:RehearsalConfig",
                   "amrpa": "athena.memory.amrpa.config:AMRPAConfig"}


class ComponentNode(TargetNode):
    """A component built from config: `_target_` plus its keyword arguments (a test binds each node of conf/ to
    its target's signature): the training task, the evaluator, extra callbacks and model transforms."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())

    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class _AdapterNodeRules(Strict):
    name: Literal[("none",) + METHODS]

    @model_validator(mode="after")
    def _parts_fit(self) -> _AdapterNodeRules:
        # The rules that span knobs are AdapterConfig's: it is built once here, so a bad mix fails before any work.
        if self.name != "none":
            try:
                AdapterConfig(**self.adapter_kwargs())
            except AdapterConfigError as error:
                raise ValueError(f"{error.field + ': ' if error.field else ''}{error.problem}") from None
        return self

    def adapter_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of athena.adapters.AdapterConfig (method = name)."""
        return {"method": self.name, **self.model_dump(exclude={"name"})}


# The knobs are AdapterConfig's own fields, taken as they are (type, bounds, default): a bad value names
# `adapter.<knob>`, and no rule or default is written twice.
AdapterNode = create_model(
    "AdapterNode", __base__=_AdapterNodeRules, __module__=__name__,
    __doc__="conf/adapter/*.yaml: `name` (none or an athena.adapters method) + every AdapterConfig knob, flat under "
            "`adapter.`; `name=none` leaves the model untouched.",
    **{knob: (info.annotation, info) for knob, info in AdapterConfig.__pydantic_fields__.items() if knob != "method"},
)

class _MemoryNodeRules(Strict):
    name: Literal["none", "amrpa"]

    @model_validator(mode="after")
    def _amrpa_fits(self) -> _MemoryNodeRules:
        if self.name != "none":
            try:
                AMRPAConfig(**self.amrpa_kwargs())
            except AMRPAConfigError as error:
                raise ValueError(f"{error.field + ': ' if error.field else ''}{error.problem}") from None
        return self

    def amrpa_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of athena.memory.amrpa.AMRPAConfig."""
        return self.model_dump(exclude={"name"})


# As AdapterNode: AMRPAConfig's own fields, so a bad value names `memory.<knob>` and no default is written twice.
MemoryNode = create_model(
    "MemoryNode", __base__=_MemoryNodeRules, __module__=__name__,
    __doc__="conf/memory/*.yaml: `name` (none or amrpa) + every AMRPAConfig knob, flat under `memory.`; `name=none` "
            "leaves the model untouched.",
    **{knob: (info.annotation, info) for knob, info in AMRPAConfig.__pydantic_fields__.items()},
)


def schema_default(reference: str) -> Any:
    """`${default:trm.rope_theta}` in conf/: that knob's default in its schema (SCHEMA_DEFAULTS). config.json and
    checkpoints record the resolved value a run used."""
    schema, _, knob = reference.partition(".")
    if schema not in SCHEMA_DEFAULTS:
        raise KeyError(f"${{default:{reference}}}: no schema {schema!r}; known: {', '.join(SCHEMA_DEFAULTS)}")
    fields = _load(SCHEMA_DEFAULTS[schema]).__pydantic_fields__
    if knob not in fields:
        raise KeyError(f"${{default:{reference}}}: {schema} has no knob {knob!r}")
    value = fields[knob].get_default(call_default_factory=True)
    # A list or dict as an OmegaConf container: OmegaConf.resolve (`--cfg job --resolve`) cannot put a plain one in
    # place of the interpolation.
    return OmegaConf.create(value) if isinstance(value, (list, dict)) else value


OmegaConf.register_new_resolver("default", schema_default, replace=True)


class DataConfig(Strict):
    name: str
    dir: str | None = None
    build: dict[str, Any]

    @model_validator(mode="after")
    def _build_has_target(self) -> DataConfig:
        if "_target_" not in self.build:
            raise ValueError("data.build needs a `_target_` naming the builder function")
        return self


class RunConfig(Strict):
    seed: int
    device: str
    resume: str
    init_from: str | None = None
    data_root: str
    train: TrainConfig
    arch: ArchNode
    adapter: AdapterNode
    data: DataConfig
    optimizer: OptimizerConfig
    freezing: FreezingConfig  # progressive freezing's schema is the component's (athena.training.freezing_config)
    exit: ExitConfig  # none, or hierarchical: exit gates + capacity routers (athena/adaptive/config.py)
    memory: MemoryNode = MemoryNode(name="none")  # cross-layer attention memory (configs stored before it: none)
    logger: LoggerConfig
    rehearsal: RehearsalConfig = RehearsalConfig(name="none")  # cross-task replay (athena.training.rehearsal)
    # Defaults for configs stored before these existed (TRM runs scored as puzzles).
    task: ComponentNode = ComponentNode(target="athena.training.tasks.TRMTask")  # a batch -> a loss
    evaluator: ComponentNode = ComponentNode(target="athena.eval.evaluators.PuzzleEvaluator")  # scores the test split
    callbacks: list[ComponentNode] = []  # extra training callbacks (athena.training.callbacks.Callback)
    model_transforms: list[ComponentNode] = []  # extra f(model, cfg) -> model, after the built-in ones
    _arch_config: BaseModel | None = PrivateAttr(default=None)

    @property
    def arch_config(self) -> BaseModel | None:
        """The arch's hyperparameters as the model's own schema (e.g. TRMConfig), every default filled in; None for
        a model class without a registered schema."""
        if self._arch_config is None:
            self._arch_config = arch_schema(self.arch.target, self.arch.hyperparameters())
        return self._arch_config

    def dataset_dir(self) -> Path:
        """Where this run's dataset is cached: data.dir, or <data_root>/<name>-<hash of its build spec>."""
        from athena.data.build import dataset_dir

        return dataset_dir(self.data.name, self.data.build, self.data_root, self.data.dir)

    def resolved(self) -> dict[str, Any]:
        """The whole run config as a plain dict with every default filled in (arch included): what config.json and
        checkpoints record, and what a resumed or evaluated run is checked against."""
        out = self.model_dump(by_alias=True, mode="json")
        schema = self.arch_config
        if schema is not None:
            out["arch"] = {"_target_": self.arch.target, **({"_partial_": True} if self.arch.partial else {}),
                           **schema.model_dump(mode="json")}
        return out

    @model_validator(mode="after")
    def _device_known(self) -> RunConfig:
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        return self


def validate_config(config: dict[str, Any]) -> RunConfig:
    """Check a resolved config (plain dict) and return it typed; raise ConfigError with one line."""
    config = {key: value for key, value in config.items() if key != "hydra"}
    try:
        run = RunConfig.model_validate(config)
    except ValidationError as error:
        raise ConfigError(f"invalid config: {describe(error)}") from None
    run.arch_config  # the model's own schema: its rules and defaults, one line on the first problem
    return run


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str]) -> dict[str, Any]:
    """The resolved config tree that `pretrain.py OVERRIDES...` would run with, as a plain dict (not validated),
    for scripts that build runs without going through Hydra's command line."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)


def _load(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def arch_schema(target: str, hyperparameters: dict[str, Any]) -> BaseModel | None:
    """The validated schema object of an arch node (None for a model class without a registered schema)."""
    if target not in ARCH_SCHEMAS:
        return None
    try:
        return _load(ARCH_SCHEMAS[target])(**hyperparameters)
    except ValidationError as error:
        raise ConfigError(f"invalid config: {describe(error, prefix='arch')}") from None


def build_component(node: TargetNode, *, partial: bool = False, **extra: Any) -> Any:
    """Instantiate a config node (`_target_` + its keyword arguments, + `extra`). A user error the target raises
    (an AthenaError: a bad argument, a missing file) comes out as itself, one line, not inside Hydra's
    InstantiationException; a ValueError from a constructor's own argument checks becomes a ConfigError naming it."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    fields = node.kwargs() if isinstance(node, ComponentNode) else node.hyperparameters() if isinstance(
        node, ArchNode) else {}
    spec = {"_target_": node.target, **({"_partial_": True} if partial or node.partial else {}), **fields}
    try:
        return instantiate(spec, **extra)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, AthenaError):
            raise cause from None
        if isinstance(cause, ValueError):  # a constructor's own check, which names its class
            raise ConfigError(f"invalid config: {cause}") from None
        if isinstance(cause, TypeError):  # e.g. an argument the target does not take
            raise ConfigError(f"invalid config: {node.target}: {cause}") from None
        raise
