"""Evaluate a checkpoint on a puzzle test split.

    python evaluate.py checkpoint=outputs/<date>/<time>/checkpoints/last.pt
    python evaluate.py checkpoint=... data=sudoku_x eval.max_examples=1000 eval.weights=raw

Uses the config stored in the checkpoint (arch, data), the EMA weights by default, and writes
eval/<name>.json plus plots (accuracy per ACT step, halting histogram) next to the run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from athena.cli import exit_with_error, one_line_errors

log = logging.getLogger("athena")


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    from torch.utils.data import DataLoader

    from athena.config import validate_config
    from athena.data.build import ensure_dataset
    from athena.data.format import PuzzleBatchSampler, PuzzleDataset
    from athena.eval.plots import plot_accuracy_by_step
    from athena.eval.puzzle_eval import evaluate_puzzles
    from athena.errors import AthenaError
    from athena.training.checkpoint import (
        CheckpointError, load_checkpoint, load_weights, model_weights, resolve_checkpoint_path,
    )
    from athena.training.distributed import pick_device
    from athena.training.recipe import attach_adapter, autocast_for, build_model, dataset_dir

    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise AthenaError("no checkpoint given: python evaluate.py checkpoint=outputs/<date>/<time>/checkpoints/last.pt "
                          "(or a run folder)")
    checkpoint = resolve_checkpoint_path(cfg.checkpoint)
    state = load_checkpoint(checkpoint)
    if state["format"] == "weights-only" or not state.get("config"):
        raise CheckpointError(f"{checkpoint} carries no run config; evaluate a checkpoint written by pretrain.py")
    stored = dict(state["config"])
    trained_on = (stored.get("data") or {}).get("name")
    if cfg.get("data") is not None:
        stored["data"] = OmegaConf.to_container(cfg.data, resolve=True)
    stored["data_root"] = cfg.data_root
    run_cfg = validate_config(stored)

    device = pick_device(cfg.eval.device)
    data_dir = ensure_dataset(dataset_dir(run_cfg), dict(run_cfg.data.build))
    test_set = PuzzleDataset(data_dir, "test")
    model = attach_adapter(build_model(run_cfg, test_set.metadata), run_cfg.adapter)  # an adapter run's checkpoint
    if cfg.eval.weights == "ema" and not state.get("ema"):
        raise CheckpointError(f"{checkpoint} has no EMA weights (trained with ema_decay=null); use eval.weights=raw")
    source = f"{checkpoint} (trained on data={trained_on})"
    if run_cfg.data.name != trained_on:
        meta = test_set.metadata
        source += (f", evaluated on data={run_cfg.data.name} (vocab {meta.vocab_size}, seq_len {meta.seq_len}, "
                   f"{meta.num_puzzle_identifiers} puzzle ids): pick a task of the same shape")
    load_weights(model, model_weights(state, cfg.eval.weights), source)
    model.to(device).eval()

    _, autocast = autocast_for(device, cfg.eval.precision)
    sampler = PuzzleBatchSampler(test_set, cfg.eval.batch_size, train=False, seed=run_cfg.seed,
                                 max_examples=cfg.eval.max_examples)
    loader = DataLoader(test_set, sampler=sampler, batch_size=None, pin_memory=device.type == "cuda")
    is_arc = run_cfg.data.build["_target_"].endswith("build_arc")
    result = evaluate_puzzles(model, loader, device, halt_max_steps=run_cfg.arch.halt_max_steps,
                              progress=True, keep_predictions=is_arc, autocast=autocast)
    arc_scores = {}
    if is_arc:  # vote over the augmented copies of each test input, scored as ARC does
        from athena.data.arc import arc_pass_at_k

        kept = result.predictions
        arc_scores = arc_pass_at_k(data_dir, kept["prediction"].numpy(), q_halt=kept["q_halt_logit"].numpy(),
                                   example_indices=kept["index"].numpy())

    out_dir = Path(cfg.eval.output_dir) if cfg.eval.output_dir else checkpoint.resolve().parent.parent / "eval"
    name = cfg.eval.name or f"test_{run_cfg.data.name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"checkpoint": str(checkpoint), "step": state.get("step"), "weights": cfg.eval.weights,
               "data": run_cfg.data.name, **result.summary(), **arc_scores}
    (out_dir / f"{name}.json").write_text(json.dumps(summary, indent=2))
    plot_accuracy_by_step(result.exact_accuracy_by_step, result.halt_step_counts, out_dir / f"{name}_by_step.png",
                          title=f"{run_cfg.data.name}, {checkpoint.name}")
    arc_line = (f", ARC pass@1 {100 * arc_scores['pass@1']:.2f}%, pass@2 {100 * arc_scores['pass@2']:.2f}% "
                f"over {arc_scores['num_tasks']} tasks" if arc_scores else "")
    print(f"[athena] {run_cfg.data.name} (n={result.count}, {cfg.eval.weights} weights): "
          f"exact accuracy {100 * result.exact_accuracy:.2f}%, token accuracy {100 * result.token_accuracy:.2f}%, "
          f"exact at Q-head halt {100 * result.exact_accuracy_at_halt:.2f}% after {result.mean_halt_steps:.1f} steps"
          f"{arc_line}\n[athena] wrote {out_dir / (name + '.json')}")
    return summary


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from athena.errors import AthenaError

    try:
        evaluate_checkpoint(cfg)
    except AthenaError as error:
        exit_with_error(str(error))


if __name__ == "__main__":
    one_line_errors("eval")
    main()
