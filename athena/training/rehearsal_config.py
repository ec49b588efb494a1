"""The schema of `rehearsal=` (conf/rehearsal/*.yaml): the buffer's knobs (athena.memory.rehearsal_config) plus which
earlier tasks fill it. No torch: athena.config imports this before any compute."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from athena.memory.rehearsal_config import RehearsalKnobs

DATA_CONF = Path(__file__).resolve().parents[2] / "conf" / "data"


def is_built_dataset(path: str | Path) -> bool:
    return (Path(path) / "train" / "dataset.json").is_file()


class RehearsalConfig(RehearsalKnobs):
    """`none`: no replay. `buffer`: a RehearsalBuffer filled, before training, with `fill_per_task` samples of each
    earlier task's train split (`from_data`: conf/data option names, built with the same builders and cache as
    `data=`, or folders of built datasets), mixed into every batch at `replay_ratio`."""

    name: Literal["none", "buffer"]
    from_data: list[str] = []
    fill_per_task: int | None = Field(default=None, ge=1)  # samples drawn from each earlier task; null: budget

    @field_validator("from_data")
    @classmethod
    def _earlier_tasks_known(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            if not (DATA_CONF / f"{entry}.yaml").is_file() and not is_built_dataset(entry):
                known = ", ".join(sorted(p.stem for p in DATA_CONF.glob("*.yaml")))
                raise ValueError(f"{entry!r} is neither a data option (conf/data/{entry}.yaml) nor a built dataset "
                                 f"folder (with train/dataset.json); data options: {known}")
        return entries

    @model_validator(mode="after")
    def _buffer_has_tasks(self) -> RehearsalConfig:
        if self.name != "none" and not self.from_data:
            raise ValueError("`buffer` needs the earlier tasks' data: rehearsal.from_data=[<data option>, ...]")
        return self

    def buffer_knobs(self) -> dict:
        return self.model_dump(include=set(RehearsalKnobs.model_fields))
