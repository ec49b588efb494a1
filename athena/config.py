"""The schema of a whole run, checked before any compute.

Hydra composes `conf/` into one tree; `validate_config` turns it into a `RunConfig` and stops with
one line naming the offending key when a key is unknown, a value has the wrong type, or a value
is impossible (negative lr, zero cycles, ...). Every `_target_` node keeps its name as `target`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from athena.adapters.config import METHODS, AdapterConfig, AdapterConfigError, default_value
from athena.errors import AthenaError


class ConfigError(AthenaError, ValueError):
    """A run configuration that cannot work; the message says which key and how to fix it."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())


class TargetNode(Strict):
    target: str = Field(alias="_target_")
    partial: bool = Field(default=False, alias="_partial_")


class TRMArch(TargetNode):
    hidden_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    expansion: float = Field(gt=0)
    num_layers: int = Field(gt=0)
    H_cycles: int = Field(ge=1)
    L_cycles: int = Field(ge=1)
    halt_max_steps: int = Field(ge=1)
    halt_exploration_prob: float = Field(ge=0, le=1)
    puzzle_emb_len: int = Field(ge=0)
    mixer: Literal["attention", "mlp"]
    rope_theta: float = Field(gt=0)
    rms_norm_eps: float = Field(gt=0)
    halt_loss_weight: float = Field(ge=0)
    gradient_checkpointing: bool = False
    loss_type: Literal["stablemax", "softmax"] = "stablemax"
    puzzle_emb_dim: int | None = Field(default=None, gt=0)
    stream_dtype: Literal["float32", "autocast"] = "autocast"

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TRMArch:
        if self.mixer == "attention" and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.mixer == "attention" and (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"head size hidden_size/num_heads = {self.hidden_size // self.num_heads} must be even "
                             "(rotary embeddings rotate pairs)")
        return self


class NamedOnly(Strict):
    """Groups that only have `none` so far (freezing, exit)."""

    name: Literal["none"]


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

def _adapter_default(knob: str) -> Any:
    """conf/adapter_parts/*.yaml give each knob as `${adapter_default:<knob>}`: the value is AdapterConfig's default,
    written only there, and the resolved config (config.json, checkpoints) still records the value a run used."""
    value = default_value(knob)
    # A list or dict as an OmegaConf container: OmegaConf.resolve (`--cfg job --resolve`) cannot put a plain one in
    # place of the interpolation.
    return OmegaConf.create(value) if isinstance(value, (list, dict)) else value


OmegaConf.register_new_resolver("adapter_default", _adapter_default, replace=True)


class DataConfig(Strict):
    name: str
    dir: str | None = None
    build: dict[str, Any]

    @model_validator(mode="after")
    def _build_has_target(self) -> DataConfig:
        if "_target_" not in self.build:
            raise ValueError("data.build needs a `_target_` naming the builder function")
        return self


class OptimizerNode(TargetNode):
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    betas: tuple[float, float] | None = None
    eps: float | None = Field(default=None, gt=0)
    fused: bool | None = None


class OptimizerConfig(Strict):
    name: str
    model: OptimizerNode
    puzzle_embedding: OptimizerNode


class LoggerConfig(Strict):
    name: Literal["none", "wandb"]
    project: str = "athena"
    entity: str | None = None
    run_name: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    tags: list[str] = []


class TrainConfig(Strict):
    global_batch_size: int = Field(gt=0)
    steps: int | None = Field(default=None, gt=0)
    epochs: float | None = Field(default=None, gt=0)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    puzzle_emb_lr: float = Field(gt=0)
    puzzle_emb_weight_decay: float = Field(ge=0)
    grad_accum_steps: int = Field(gt=0)
    lr_warmup_steps: int = Field(ge=0)
    lr_schedule: Literal["cosine", "constant"]
    lr_min_ratio: float = Field(ge=0, le=1)
    grad_clip: float | None = Field(default=None, gt=0)
    precision: Literal["auto", "fp32", "bf16"]
    compile: bool
    compile_mode: Literal["default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"] = "default"
    ema_decay: float | None = Field(default=None, ge=0, lt=1)
    num_workers: int = Field(ge=0)
    log_every: int = Field(gt=0)
    eval_every: int | None = Field(default=None, gt=0)
    eval_examples: int | None = Field(default=None, gt=0)
    eval_batch_size: int = Field(gt=0)
    checkpoint_every: int | None = Field(default=None, gt=0)
    keep_checkpoints: int = Field(gt=0)
    max_minutes: float | None = Field(default=None, gt=0)
    # Under torchrun: ddp = replicated weights + one flat gradient all-reduce; fsdp = FSDP2 (fully_shard), the
    # dense weights, gradients and optimizer state sharded over ranks. One process ignores it.
    parallel: Literal["ddp", "fsdp"] = "ddp"

    @model_validator(mode="after")
    def _length_given_once(self) -> TrainConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.steps and train.epochs (the other to null)")
        if self.global_batch_size % self.grad_accum_steps:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not divisible by grad_accum_steps {self.grad_accum_steps}"
            )
        if self.parallel == "fsdp" and self.compile:
            raise ValueError("train.compile=true is not supported with train.parallel=fsdp yet; "
                             "use train.compile=false or train.parallel=ddp")
        return self


class RunConfig(Strict):
    seed: int
    device: str
    resume: str
    init_from: str | None = None
    data_root: str
    train: TrainConfig
    arch: TRMArch
    adapter: AdapterNode
    data: DataConfig
    optimizer: OptimizerConfig
    freezing: NamedOnly
    exit: NamedOnly
    logger: LoggerConfig

    @model_validator(mode="after")
    def _device_known(self) -> RunConfig:
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        return self


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "config"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"unknown key (remove it, or check its spelling against conf/)"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        message = f"{message} (got {first['input']!r})"
    more = len(error.errors()) - 1
    tail = f" [and {more} more problem{'s' if more > 1 else ''}]" if more else ""
    return f"invalid config: {where}: {message}{tail}"


def validate_config(config: dict[str, Any]) -> RunConfig:
    """Check a resolved config (plain dict) and return it typed; raise ConfigError with one line."""
    config = {key: value for key, value in config.items() if key != "hydra"}
    try:
        return RunConfig.model_validate(config)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str]) -> dict[str, Any]:
    """The resolved config tree that `pretrain.py OVERRIDES...` would run with, as a plain dict (not validated),
    for scripts that build runs without going through Hydra's command line."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
