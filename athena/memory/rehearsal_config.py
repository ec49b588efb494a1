"""The knobs of a RehearsalBuffer, each with its default and bounds written once (the buffer and `rehearsal=`'s schema,
athena.training.rehearsal_config, both take them from here). No torch: config validation imports it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from athena.schema import Strict


class RehearsalKnobs(Strict):
    budget: int = Field(default=1000, ge=1)  # samples the buffer holds at most, over all tasks
    # reservoir: every sample seen so far equally likely to be held (tasks in proportion to what was added);
    # task_balanced: an equal share per task (within one, a reservoir), replayed evenly across tasks
    policy: Literal["reservoir", "task_balanced"] = "reservoir"
    replay_ratio: float = Field(default=0.25, ge=0, lt=1)  # share of each batch's rows replaced by stored samples
    seed: int = 0  # the buffer's own random stream (which samples it keeps, which it replays)
