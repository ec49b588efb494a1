"""The seams of DESIGN.md work from outside athena/: a model transform, a callback (an aux loss, freezing a module
mid-run, its own logged metric and checkpointed state), a training task and an evaluator, each written in
tests/plugins.py and switched on by config alone, in pretrain.py, evaluate.py and a resumed run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import run_script

pytestmark = pytest.mark.slow  # end-to-end runs in subprocesses

PLUGGED = ("experiment=smoke", "train.eval_every=null",
           "model_transforms=[{_target_:tests.plugins.add_output_bias}]",
           "callbacks=[{_target_:tests.plugins.FreezeModuleAt,module:net.layers.0,step:10}]",
           "task._target_=tests.plugins.CountingTask")


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def plugged_run(tmp_path_factory, data_root):
    run_dir = tmp_path_factory.mktemp("plugged")
    run_script("pretrain.py", *PLUGGED, f"hydra.run.dir={run_dir}", data_root=data_root)
    load = lambda name: torch.load(run_dir / "checkpoints" / name, weights_only=True)  # noqa: E731
    return run_dir, load("step_10.pt"), load("step_20.pt")


def test_a_model_transform_from_outside_is_built_trained_saved_and_rebuilt_by_evaluate(plugged_run, data_root):
    run_dir, _, last = plugged_run
    assert last["model"]["lm_head.plugin_bias"].abs().sum() > 0  # built (zero-initialised) and trained
    assert last["config"]["model_transforms"][0]["_target_"] == "tests.plugins.add_output_bias"
    # evaluate.py builds the model by the same path, transform included, and scores it as the run did.
    run_script("evaluate.py", f"checkpoint={run_dir}", "eval.name=again", data_root=data_root)
    final = json.loads((run_dir / "eval" / "final.json").read_text())
    again = json.loads((run_dir / "eval" / "again.json").read_text())
    for key in ("count", "exact_accuracy", "token_accuracy", "exact_accuracy_by_step"):
        assert again[key] == final[key], key


def test_a_callback_adds_a_loss_a_metric_state_and_freezes_a_module_mid_run(plugged_run):
    run_dir, at_10, at_20 = plugged_run
    train = [r for r in rows(run_dir) if "train/lm_loss" in r]
    assert all(r["train/plugin_l2"] > 0 for r in train)  # its aux loss, logged under its name
    assert [r["plugin/steps_seen"] for r in train] == [5, 10, 15, 20]  # its own metric
    assert at_20["callbacks"]["freeze_plugin"] == {"steps_seen": 20}  # its state, in the checkpoint
    frozen = [name for name in at_10["ema"] if name.startswith("net.layers.0.")]
    assert frozen
    for name in at_10["ema"]:  # frozen at step 10: weights and EMA stand still, everything else moves
        for part in ("model", "ema"):
            still = torch.equal(at_10[part][name], at_20[part][name])
            assert still == (name in frozen), f"{part}.{name}"
    # The optimizer made no update for them: their Adam moments are untouched (every other one moved).
    unchanged = [i for i, s in at_20["optimizers"][0]["state"].items()
                 if all(torch.equal(v, at_10["optimizers"][0]["state"][i][k]) for k, v in s.items() if k != "step")]
    assert len(unchanged) == len(frozen)


def test_a_task_from_outside_reports_its_metric_and_keeps_its_state(plugged_run):
    run_dir, at_10, at_20 = plugged_run
    train = [r for r in rows(run_dir) if "train/lm_loss" in r]
    # Logged as a mean per step over each window of 5 steps; the task's own count is the total.
    assert sum(5 * r["train/labelled_cells"] for r in train) == at_20["task"]["cells"] > at_10["task"]["cells"] > 0
    assert len(at_20["task"]["carries"]) == 1  # TRM's carry, kept by the subclass


def test_a_resumed_plugged_run_restores_the_callback_and_task_state(plugged_run, tmp_path, data_root):
    run_dir, _, at_20 = plugged_run
    run_script("pretrain.py", *PLUGGED, f"hydra.run.dir={tmp_path}", f"resume={run_dir}/checkpoints/step_10.pt",
               data_root=data_root)
    resumed = torch.load(tmp_path / "checkpoints" / "step_20.pt", weights_only=True)
    assert resumed["callbacks"] == at_20["callbacks"] and resumed["task"]["cells"] == at_20["task"]["cells"]
    for part in ("model", "ema"):
        for name, tensor in at_20[part].items():
            assert torch.equal(resumed[part][name], tensor), f"{part}.{name}"


def test_an_evaluator_from_outside_scores_the_final_eval(tmp_path, data_root):
    proc = run_script("pretrain.py", "experiment=smoke", "train.steps=2", "train.eval_every=null",
                      "evaluator._target_=tests.plugins.BlankCellEvaluator", f"hydra.run.dir={tmp_path}",
                      data_root=data_root)
    test_split = next(data_root.glob("sudoku4-*")) / "test"
    labels = np.load(test_split / "all__labels.npy")
    ignored = json.loads((test_split / "dataset.json").read_text())["ignore_label_id"]
    expected = int((labels != ignored).sum())
    final = json.loads((tmp_path / "eval" / "final.json").read_text())
    assert final == {"step": 2, "blank_cells": expected, "count": len(labels)}
    assert f"{expected} blank cells" in proc.stdout
