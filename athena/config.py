"""The schema of a whole run, checked before any compute.

Hydra composes `conf/` into one tree; `validate_config` turns it into a `RunConfig` and stops with
one line naming the offending key when a key is unknown, a value has the wrong type, or a value
is impossible (negative lr, zero cycles, ...). Every `_target_` node keeps its name as `target`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from athena.errors import ConfigError
from athena.schema import Strict, TargetNode, describe
from athena.training.config import LoggerConfig, OptimizerConfig, TrainConfig


class ArchNode(TargetNode):
    """conf/arch/*.yaml: `_target_` (the model class) + its hyperparameters, checked by the schema the model owns
    (ARCH_SCHEMAS) in validate_config, so each rule and default lives in one place."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())

    def hyperparameters(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


# The schema of each model class's hyperparameters (module:class, imported only when used).
ARCH_SCHEMAS = {"athena.models.trm.TinyRecursiveModel": "athena.models.trm.config:TRMConfig"}
# Schemas whose defaults conf/ composes as `/schema/<name>` (register_schema_defaults): the YAML options list what
# they change, and every other knob is still there to override (arch.rope_theta=...) with its one default.
SCHEMA_DEFAULTS = {"trm": "athena.models.trm.config:TRMConfig"}


class ComponentNode(TargetNode):
    """A component built from config: `_target_` plus its keyword arguments (a test binds each node of conf/ to
    its target's signature): the training task, the evaluator, extra callbacks and model transforms."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())

    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class NamedOnly(Strict):
    """Groups that only have `none` so far (freezing, exit)."""

    name: Literal["none"]


# Parts (LoRA, IA3, experts) each method switches on when use_lora / use_ia3 / use_moe are null, as in
# athena.adapters.AdapterConfig (which checks the same rules again when the adapter is built).
_ADAPTER_PARTS = {"lora": (True, False, False), "ia3": (False, True, False), "moe": (False, False, True),
                  "poly": (True, True, True), "hybrid": (True, False, False)}


class AdapterNode(Strict):
    """conf/adapter/*.yaml: `name` (none or an athena.adapters method) + the AdapterConfig knobs.

    The defaults equal athena.adapters.AdapterConfig's; `name=none` leaves the model untouched.
    """

    name: Literal["none", "lora", "ia3", "moe", "poly", "hybrid"]
    rank: int = Field(default=8, ge=0)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    use_rslora: bool = False
    use_lora: bool | None = None
    use_ia3: bool | None = None
    use_moe: bool | None = None
    ia3_recompute: bool = False
    num_experts: int = Field(default=4, ge=1)
    top_k: int = Field(default=2, ge=1)
    expert_rank: int | None = Field(default=None, gt=0)
    router_aux_weight: float = Field(default=0.01, ge=0)
    router_z_weight: float = Field(default=0.001, ge=0)
    target_modules: list[str] | None = None
    apply_lora_to: list[str] | None = None
    bottleneck_size: int = Field(default=64, gt=0)
    bottleneck_activation: Literal["gelu", "relu", "silu", "tanh", "identity"] = "gelu"
    bottleneck_dropout: float = Field(default=0.0, ge=0, lt=1)
    bottleneck_gating: bool = False
    share_across_layers: bool = False
    rank_pattern: dict[str, int] = {}
    layers_to_skip: list[int] = []
    freeze_base: bool = True

    @model_validator(mode="after")
    def _parts_fit(self) -> AdapterNode:
        if self.name == "none":
            return self
        implied = _ADAPTER_PARTS[self.name]
        lora, ia3, moe = (i if v is None else v for i, v in zip(implied, (self.use_lora, self.use_ia3, self.use_moe)))
        if lora and self.rank == 0:
            raise ValueError(f"rank=0 with LoRA on (adapter={self.name}); use rank >= 1 or use_lora=false")
        if self.name != "hybrid" and not (lora or ia3 or moe):
            raise ValueError(f"adapter={self.name} with use_lora, use_ia3 and use_moe all false adds nothing")
        if moe and self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} is larger than num_experts={self.num_experts}")
        if moe and self.expert_rank is None and self.rank == 0:
            raise ValueError("experts need a rank: set expert_rank >= 1 (or rank >= 1)")
        bad = {k: v for k, v in self.rank_pattern.items() if v <= 0}
        if bad:
            raise ValueError(f"rank_pattern ranks must be >= 1, got {bad}")
        if any(i < 0 for i in self.layers_to_skip):
            raise ValueError(f"layers_to_skip holds layer indices >= 0, got {self.layers_to_skip}")
        if self.target_modules == []:
            raise ValueError("target_modules=[] selects nothing; list module names/regexes or leave it null")
        return self

    def adapter_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of athena.adapters.AdapterConfig (method = name)."""
        kwargs = self.model_dump(exclude={"name"})
        return {"method": self.name, **kwargs}


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
    freezing: NamedOnly
    exit: NamedOnly
    logger: LoggerConfig
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

    register_schema_defaults()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)


def register_schema_defaults() -> None:
    """Put each schema's defaults in Hydra's ConfigStore as schema/<name>, for conf/ to compose. Call before
    Hydra composes (pretrain.py, evaluate.py and compose_config do)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, path in SCHEMA_DEFAULTS.items():
        store.store(group="schema", name=name, node=_load(path)().model_dump(mode="json"))


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
