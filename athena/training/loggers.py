"""Where metrics go: metrics.jsonl in the run folder always, W&B when asked for.

Every logger takes the same flat dict of keys (`train/lm_loss`, `eval/exact_accuracy`, ...).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class JSONLLogger:
    """One JSON object per line: {"step": N, "time": unix seconds, key: value, ...}."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")

    def log_images(self, images: dict[str, Path], step: int) -> None:
        self.log({key: str(path) for key, path in images.items()}, step)

    def finish(self) -> None:
        self._file.close()


class WandbLogger:
    """Real wandb; offline unless a key is configured, so it never needs an account."""

    def __init__(self, *, run_dir: Path, config: dict[str, Any], project: str, entity: str | None,
                 run_name: str | None, mode: str, tags: list[str], run_id: str | None):
        import wandb

        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self._wandb = wandb
        self.run = wandb.init(
            project=project, entity=entity, name=run_name, mode=mode, tags=tags, config=config,
            dir=str(run_dir), id=run_id, resume="allow" if run_id else None, reinit="finish_previous",
        )

    @property
    def run_id(self) -> str | None:
        return getattr(self.run, "id", None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        self.run.log({key: self._wandb.Image(str(path)) for key, path in images.items()}, step=step)

    def finish(self) -> None:
        self.run.finish()


class Loggers:
    """Fans one log call out to every active logger."""

    def __init__(self, loggers: list):
        self.loggers = loggers

    @property
    def wandb_run_id(self) -> str | None:
        return next((lg.run_id for lg in self.loggers if isinstance(lg, WandbLogger)), None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        for logger in self.loggers:
            logger.log_images(images, step)

    def finish(self) -> None:
        for logger in self.loggers:
            logger.finish()


def build_loggers(cfg, run_dir: Path, config_dict: dict[str, Any], resume_run_id: str | None, is_main: bool) -> Loggers:
    """metrics.jsonl always (rank 0); W&B on rank 0 when `logger=wandb`."""
    if not is_main:
        return Loggers([])
    loggers: list = [JSONLLogger(run_dir / "metrics.jsonl")]
    if cfg.name == "wandb":
        loggers.append(WandbLogger(
            run_dir=run_dir, config=config_dict, project=cfg.project, entity=cfg.entity,
            run_name=cfg.run_name, mode=cfg.mode, tags=cfg.tags, run_id=resume_run_id,
        ))
    return Loggers(loggers)
