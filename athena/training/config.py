"""Schemas of the training loop's config: `train`, `optimizer`, `logger` (composed by athena.config.RunConfig)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from athena.schema import Strict, TargetNode


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
    eval_at_start: bool = False  # also evaluate before the first step: the "before" of an adaptation run
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
