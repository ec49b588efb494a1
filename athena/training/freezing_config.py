"""The schema of `freezing=` (conf/freezing/*.yaml): progressive freezing's knobs, each with its default and bounds
written once here. ProgressiveFreezingScheduler (athena.training.freezing) takes the same knobs as keyword
arguments and checks them with FreezingKnobs, so Python and config users get the same rules. No torch here:
athena.config imports this before any compute."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from athena.schema import Strict


class FreezingKnobs(Strict):
    """Progressive freezing, per layer (input embedding, then each block): moving averages of the layer's gradient
    norm and of its relative parameter change per step; a layer freezes when both stay under their thresholds for
    `window_size` consecutive checks and every layer before it is frozen; a loss spike thaws."""

    threshold: float = Field(default=1e-5, gt=0)  # gradient-norm moving average (L2 over the layer) to freeze under
    change_threshold: float | None = Field(default=None, gt=0)  # relative change ||dW||/||W|| per step; null: threshold
    window_size: int = Field(default=10, ge=1)  # consecutive checks both averages must stay under their thresholds
    ema_beta: float = Field(default=0.9, ge=0, lt=1)  # decay of the moving averages (statistics and loss)
    check_every: int = Field(default=1, ge=1)  # steps between checks; each reads a few numbers back from the device
    warmup_steps: int = Field(default=0, ge=0)  # no layer freezes before this step (statistics still accumulate)
    max_frozen: int | None = Field(default=None, ge=0)  # at most this many layers frozen; null: all may freeze
    spike_factor: float | None = Field(default=2.0, gt=1)  # loss > factor x its moving average thaws; null: never
    unfreeze: Literal["last", "all"] = "last"  # on a spike: the frozen layer nearest the output, or the whole prefix
    adaptive_threshold: bool = False  # thresholds relative to each layer's own early statistics (scale-free)
    adaptive_ratio: float = Field(default=0.1, gt=0, lt=1)  # adaptive: freeze below this share of the early average
    adaptive_decay: float = Field(default=0.5, gt=0, le=1)  # adaptive: after each spike, thresholds x this
    include_embeddings: bool = True  # the input embedding is the first layer (tied to the head: its input role only)


class FreezingConfig(FreezingKnobs):
    """conf/freezing/*.yaml: `none` keeps the trainable set fixed; `progressive` switches the scheduler on as a
    training callback with the knobs above."""

    name: Literal["none", "progressive"]

    def knobs(self) -> dict:
        return self.model_dump(exclude={"name"})
