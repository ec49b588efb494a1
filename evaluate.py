"""Evaluate a checkpoint on a test split.

    python evaluate.py checkpoint=outputs/<date>/<time>/checkpoints/last.pt      # or the run folder
    python evaluate.py checkpoint=... data=sudoku_x eval.max_examples=1000 eval.weights=raw [evaluator=arc]
    python evaluate.py checkpoint=... evaluator=lm_eval eval.tasks=[wordnet_gloss]     # a causal LM, lm-eval tasks

Uses the config stored in the checkpoint (arch, adapters, data, evaluator), builds the model by the same path
training does (athena.models.build), loads the EMA weights by default, scores it with the run's evaluator (or the
one given) and writes eval/<name>.json plus plots next to the run.
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

    from athena.checkpoint import CheckpointError, load_checkpoint, load_weights, model_weights, resolve_checkpoint_path
    from athena.config import build_component, validate_config
    from athena.data.build import ensure_dataset
    from athena.data.format import PuzzleDataset
    from athena.data.sampler import PuzzleBatchSampler
    from athena.device import autocast_for, pick_device
    from athena.errors import AthenaError
    from athena.eval.evaluators import EvalContext
    from athena.models.build import build_run_model

    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise AthenaError("no checkpoint given: python evaluate.py checkpoint=outputs/<date>/<time>/checkpoints/last.pt "
                          "(or a run folder)")
    checkpoint = resolve_checkpoint_path(cfg.checkpoint)
    state = load_checkpoint(checkpoint)
    if state["format"] == "weights-only" or not state.get("config"):
        raise CheckpointError(f"{checkpoint} carries no run config; evaluate a checkpoint written by pretrain.py")
    stored = dict(state["config"])
    trained_on = (stored.get("data") or {}).get("name")
    for section in ("data", "evaluator"):  # evaluate.py's own choice, where given, over the run's
        if cfg.get(section) is not None:
            stored[section] = OmegaConf.to_container(cfg[section], resolve=True)
    if cfg.eval.get("tasks") is not None:  # the short spelling of evaluator.tasks
        evaluator = stored.get("evaluator") or {}
        if evaluator.get("_target_") != "athena.eval.lm_eval.LMEvalEvaluator":
            raise AthenaError("eval.tasks names lm-eval tasks, but this evaluation is not lm-eval: add evaluator=lm_eval")
        stored["evaluator"] = {**evaluator, "tasks": list(cfg.eval.tasks)}
    stored["data_root"] = cfg.data_root
    run_cfg = validate_config(stored)

    device = pick_device(cfg.eval.device)
    data = run_cfg.data
    data_dir = ensure_dataset(run_cfg.dataset_dir(), dict(data.build))
    test_set = PuzzleDataset(data_dir, "test")
    model = build_run_model(run_cfg, test_set.metadata, load_init=False)  # the checkpoint holds every weight
    if cfg.eval.weights == "ema" and not state.get("ema"):
        raise CheckpointError(f"{checkpoint} has no EMA weights (trained with ema_decay=null); use eval.weights=raw")
    source = f"{checkpoint} (trained on data={trained_on})"
    if data.name != trained_on:
        meta = test_set.metadata
        source += (f", evaluated on data={data.name} (vocab {meta.vocab_size}, seq_len {meta.seq_len}, "
                   f"{meta.num_puzzle_identifiers} puzzle ids): pick a task of the same shape")
    load_weights(model, model_weights(state, cfg.eval.weights), source)
    model.to(device).eval()

    _, autocast = autocast_for(device, cfg.eval.precision)
    sampler = PuzzleBatchSampler(test_set, cfg.eval.batch_size, train=False, seed=run_cfg.seed,
                                 max_examples=cfg.eval.max_examples)
    loader = DataLoader(test_set, sampler=sampler, batch_size=None, pin_memory=device.type == "cuda")
    evaluator = build_component(run_cfg.evaluator)
    report = evaluator.evaluate(EvalContext(model=model, loader=loader, device=device, data_dir=data_dir,
                                            autocast=autocast, progress=True))

    out_dir = Path(cfg.eval.output_dir) if cfg.eval.output_dir else checkpoint.resolve().parent.parent / "eval"
    name = cfg.eval.name or f"test_{data.name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"checkpoint": str(checkpoint), "step": state.get("step"), "weights": cfg.eval.weights,
               "data": data.name, **report.summary()}
    (out_dir / f"{name}.json").write_text(json.dumps(summary, indent=2))
    report.plots(out_dir, title=f"{data.name}, {checkpoint.name}", stem=f"{name}_by_step")
    print(f"[athena] {data.name} ({report.scope()}, {cfg.eval.weights} weights): {report.headline()}\n"
          f"[athena] wrote {out_dir / (name + '.json')}")
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
