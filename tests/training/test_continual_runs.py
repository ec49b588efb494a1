"""freezing=progressive and rehearsal=buffer in pretrain.py runs (experiment=lm_smoke, a tiny random Llama): layers
freeze and stay frozen, samples of an earlier task (text_tiny_sft's SFT rows, longer than the LM rows) are replayed
at the ratio, both are logged, and a run resumed from a checkpoint freezes the same layers and replays the same
samples: its weights at the end equal the uninterrupted run's bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import run_script

pytestmark = pytest.mark.slow  # end-to-end runs in subprocesses

# Thresholds every layer meets (gradient norms here are ~0.2-0.7, relative changes ~0.01-0.02): after the warm-up
# the whole prefix freezes at step 10, before the step-15 checkpoint the resumed run starts from.
RUN = ("experiment=lm_smoke", "train.eval_every=null", "freezing=progressive", "freezing.threshold=100",
       "freezing.change_threshold=1", "freezing.window_size=3", "freezing.warmup_steps=10", "rehearsal=buffer",
       "rehearsal.from_data=[text_tiny_sft]", "rehearsal.budget=64")


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load(run_dir, name: str) -> dict:
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)


def test_a_run_freezes_replays_and_resumes_exactly(tmp_path, data_root):
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    run_script("pretrain.py", *RUN, f"hydra.run.dir={first}", data_root=data_root)
    log = (first / "pretrain.log").read_text()
    assert "freezing: step 10: freeze model.layers.0" in log and "freezing: step 10: freeze model.layers.1" in log
    assert "the tied input embedding's input role freezes with model.layers.0" in log
    train = [r for r in rows(first) if "train/loss" in r]
    assert [r["freeze/layers_frozen"] for r in train] == [0, 2, 2, 2, 2, 2]  # logged at steps 5, 10, ..., 30
    assert all(r["rehearsal/replayed_fraction"] == 0.25 for r in train)  # 0.25 x 16 rows = 4 rows, every step
    at_15, at_30 = load(first, "step_15.pt"), load(first, "step_30.pt")
    for name, tensor in at_30["model"].items():
        if ".layers." in name:  # frozen since step 10: unchanged from 15 to 30
            assert torch.equal(tensor, at_15["model"][name]), name
    assert not torch.equal(at_30["model"]["model.norm.weight"], at_15["model"]["model.norm.weight"])  # still trains
    events = json.loads((first / "eval" / "freezing.json").read_text())["events"]
    assert [(e["step"], e["layer"], e["action"]) for e in events] == [(10, "model.layers.0", "freeze"),
                                                                      (10, "model.layers.1", "freeze")]

    run_script("pretrain.py", *RUN, f"hydra.run.dir={resumed}", f"resume={first}/checkpoints/step_15.pt",
               data_root=data_root)
    again = load(resumed, "step_30.pt")
    # Not re-freezing would train the blocks from 15 to 30; replaying other samples would change every weight.
    for name, tensor in at_30["model"].items():
        assert torch.equal(tensor, again["model"][name]), name
    assert again["callbacks"]["freezing"] == at_30["callbacks"]["freezing"]
    saved, restored = at_30["callbacks"]["rehearsal"]["buffer"], again["callbacks"]["rehearsal"]["buffer"]
    assert all(torch.equal(a, b) for key in saved["rows"] for a, b in zip(saved["rows"][key], restored["rows"][key]))
