"""Train a Tiny Recursive Model on a puzzle task.

    python pretrain.py                                   # the embedded default (small TRM, 6x6 Sudoku)
    python pretrain.py experiment=smoke                  # seconds on a CPU
    python pretrain.py arch=athena_trm data=sudoku train.steps=20000
    python pretrain.py --cfg job                         # print the composed config
    torchrun --nproc_per_node=4 pretrain.py ...          # one process per GPU; train.global_batch_size is the total

Compose (Hydra) -> validate (pydantic, before any compute) -> build data, model, optimisers ->
train -> evaluate the full test split -> save.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from athena.cli import JobFailed, exit_with_error, one_line_errors
from athena.config import validate_config
from athena.errors import AthenaError

log = logging.getLogger("athena")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        config_dict = OmegaConf.to_container(cfg, resolve=True)
        run_cfg = validate_config(config_dict)
    except (AthenaError, OmegaConfBaseException) as error:
        _remove_if_empty(run_dir)  # Hydra made the folder for this run; a refused run leaves nothing behind
        reason = str(error).strip().splitlines()[0]
        _fail(reason if isinstance(error, AthenaError) else f"invalid config: {reason}", run_dir)

    from athena.training.recipe import PretrainRecipe, TrainingStopped  # after validation: `--help`, bad configs fast

    recipe = PretrainRecipe(run_cfg, run_dir)
    try:
        try:
            with recipe.signals_stop_now():  # set-up and final evaluation; the loop saves a checkpoint instead
                recipe.setup()
                recipe.train()
                report = recipe.finish()
        finally:
            recipe.close()  # destroys the torchrun process group, if any, and unlocks the run folder
    except TrainingStopped as error:  # a signal stops the program, every job of a multirun with it
        exit_with_error(str(error))
    except AthenaError as error:
        if recipe.lock is not None:  # the folder is this run's: its log keeps why it stopped (not a busy folder's)
            log.error("error: %s", error)
        _fail(str(error), run_dir)
    if recipe.is_main:  # under torchrun only rank 0 reports
        weights = "EMA weights" if run_cfg.train.ema_decay else "trained weights"
        print(f"\n[athena] {run_cfg.data.name} test set ({report.scope()}, {weights}): {report.headline()}.\n"
              f"[athena] run folder: {recipe.run_dir}")
    return report.score


def _fail(message: str, run_dir: Path) -> None:
    """One line and exit 1. In a multirun (`-m`) only this job fails: Hydra runs the jobs after it, then the sweep
    ends with the first failed job's line (athena.cli.one_line_errors)."""
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        print(f"error: {message}", file=sys.stderr)
        raise JobFailed(f"{message} (job {run_dir})")
    exit_with_error(message)


def _remove_if_empty(folder: Path) -> None:
    """rmdir `folder` and then its parent (outputs/<date>/) if empty; a folder with anything in it stays."""
    for path in (folder, folder.parent):
        try:
            path.rmdir()
        except OSError:
            return


if __name__ == "__main__":
    one_line_errors("config")
    main()
