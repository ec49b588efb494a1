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

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from athena.config import validate_config
from athena.errors import AthenaError

log = logging.getLogger("athena")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from athena.training.recipe import PretrainRecipe  # after validation: keeps `--help` and bad configs fast

    try:
        config_dict = OmegaConf.to_container(cfg, resolve=True)
        run_cfg = validate_config(config_dict)
        run_dir = HydraConfig.get().runtime.output_dir
        recipe = PretrainRecipe(run_cfg, run_dir, config_dict)
        try:
            recipe.setup()
            recipe.train()
            result = recipe.finish()
        finally:
            recipe.close()  # destroys the torchrun process group, if any
    except AthenaError as error:
        sys.exit(f"error: {error}")
    if not recipe.is_main:  # under torchrun only rank 0 reports
        return result.exact_accuracy
    run_dir = recipe.run_dir  # rank 0's folder under torchrun
    print(
        f"\n[athena] {run_cfg.data.name} test set (n={result.count}, EMA weights, {run_cfg.arch.halt_max_steps} steps): "
        f"exact accuracy {100 * result.exact_accuracy:.2f}%, token accuracy {100 * result.token_accuracy:.2f}%, "
        f"exact at Q-head halt {100 * result.exact_accuracy_at_halt:.2f}% after {result.mean_halt_steps:.1f} steps "
        f"on average.\n[athena] run folder: {run_dir}"
    )
    return result.exact_accuracy


if __name__ == "__main__":
    main()
