"""The schema of a whole run, checked before any compute.

Hydra composes `conf/` into one tree; `validate_config` turns it into a `RunConfig` and stops with
one line naming the offending key when a key is unknown, a value has the wrong type, or a value
is impossible (negative lr, zero cycles, ...). Every `_target_` node keeps its name as `target`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
