"""Run `pretrain.py OVERRIDES` in this process (PretrainRecipe, the real loop) and score its model with lm-eval: what
bench/freezing.py and bench/continual.py share. Needs hydra/omegaconf (compose) and, for scoring, lm-eval."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from athena.config import compose_config, validate_config  # noqa: E402
from athena.training.recipe import PretrainRecipe  # noqa: E402

log = logging.getLogger("athena")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def set_up(overrides: list[str], run_dir: Path) -> PretrainRecipe:
    """The recipe of `pretrain.py overrides`, set up (data, model, optimisers, callbacks), not yet trained."""
    cfg = validate_config(compose_config(overrides))
    recipe = PretrainRecipe(cfg, run_dir)
    recipe.setup()
    return recipe


def train_timed(recipe: PretrainRecipe) -> float:
    """recipe.train(), timed (seconds, the device synchronised at both ends)."""
    sync()
    start = time.perf_counter()
    recipe.train()
    sync()
    return time.perf_counter() - start


def lm_eval_accuracy(recipe: PretrainRecipe, task_yaml: Path, limit: int | None, batch_size: int) -> float:
    """lm-eval accuracy of the recipe's model on one task (a task YAML file), with the recipe's evaluation path."""
    from athena.eval.lm_eval import LMEvalEvaluator

    recipe.evaluator = LMEvalEvaluator(tasks=[str(task_yaml)], limit=limit, batch_size=batch_size)
    report = recipe.evaluate(max_examples=None)
    [values] = report.results.values()
    return values["acc"]


def median_step_ms(run_dir: Path, batch: int, skip_first: bool = True) -> float | None:
    """Median optimizer-step time of the run's log windows (the first, which holds start-up, left out)."""
    import json
    import statistics

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r]
    rates = rates[1:] if skip_first and len(rates) > 1 else rates
    return 1000 * batch / statistics.median(rates) if rates else None


def run_and_close(recipe: PretrainRecipe, work: Callable[[PretrainRecipe], dict]) -> dict:
    try:
        return work(recipe)
    finally:
        recipe.close()
