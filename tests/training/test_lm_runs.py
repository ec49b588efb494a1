"""Language-model runs end to end, as a user runs them (experiment=lm_smoke: a tiny random Llama on the offline
docstring corpus): it learns, resumes exactly, runs under two gloo processes (DDP and FSDP2) exactly like one
process with the same micro-batches, fine-tunes on a task's answers, and adapts with LoRA into a peft adapter."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import run_script

pytestmark = pytest.mark.slow  # end-to-end runs in subprocesses

LM = ("experiment=lm_smoke",)


def rows(run_dir, key: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


def load(run_dir, name: str = "last.pt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, data_root):
    run_dir = tmp_path_factory.mktemp("lm")
    run_script("pretrain.py", *LM, "train.eval_at_start=true", f"hydra.run.dir={run_dir}", data_root=data_root)
    return run_dir


def test_a_tiny_lm_learns_the_tiny_corpus(lm_run):
    train = rows(lm_run, "train/loss")
    # A 512-token vocabulary starts at ln 512 = 6.24 nats; 30 steps take a working run to ~5.3 (it learns which
    # tokens are common and which follow which). An optimizer that never steps stays at ~6.2.
    assert train[0]["train/loss"] > 6.0 and train[-1]["train/loss"] < train[0]["train/loss"] - 0.7, train
    evals = rows(lm_run, "eval/perplexity")
    assert [r["step"] for r in evals] == [0, 15, 30]
    assert evals[-1]["eval/perplexity"] < 0.5 * evals[0]["eval/perplexity"]  # held-out text: about 500 -> ~250
    assert all(r["train/tokens_per_s"] > 0 for r in train)


def test_an_lm_run_resumes_exactly(lm_run, tmp_path, data_root):
    run_script("pretrain.py", *LM, "train.eval_at_start=true", f"hydra.run.dir={tmp_path}",
               f"resume={lm_run}/checkpoints/step_15.pt", data_root=data_root)
    assert f"resumed from {lm_run}/checkpoints/step_15.pt at step 15" in (tmp_path / "pretrain.log").read_text()
    assert rows(tmp_path, "train/loss")[0]["step"] == 20
    uninterrupted, resumed = load(lm_run, "step_30.pt"), load(tmp_path, "step_30.pt")
    for name, tensor in uninterrupted["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_supervised_fine_tuning_trains_on_the_answers(tmp_path, data_root):
    """data=text_tiny_sft: docstring summary -> name, loss on the answer only; the loss falls and lm-eval scores
    the task from the run's data folder before and after."""
    run_script("pretrain.py", *LM, "data=text_tiny_sft", "train.steps=40", "train.eval_at_start=true",
               "evaluator=lm_eval", "evaluator.tasks=[docstring_name]", "evaluator.limit=40",
               "train.eval_every=null", "train.checkpoint_every=null", f"hydra.run.dir={tmp_path}", data_root=data_root)
    train = rows(tmp_path, "train/loss")
    assert train[-1]["train/loss"] < train[0]["train/loss"] - 0.5, [r["train/loss"] for r in train]
    evals = rows(tmp_path, "eval/docstring_name/acc")
    assert [r["step"] for r in evals] == [0, 40] and all(0 <= r["eval/docstring_name/acc"] <= 1 for r in evals)
    final = json.loads((tmp_path / "eval" / "final.json").read_text())
    assert "docstring_name" in json.dumps(final)


def test_lora_on_a_pretrained_lm_trains_only_the_adapter_and_saves_it_for_peft(lm_run, tmp_path, data_root):
    from peft import PeftConfig

    base = load(lm_run)["model"]
    run_script("pretrain.py", *LM, "adapter=lora", f"init_from={lm_run}/checkpoints/last.pt", "train.steps=10",
               "train.eval_every=null", "train.checkpoint_every=null", f"hydra.run.dir={tmp_path}", data_root=data_root)
    adapted = load(tmp_path)["model"]
    lora = [name for name in adapted if "lora_" in name]
    assert lora and any(adapted[name].abs().sum() > 0 for name in lora if "lora_B" in name)  # B left zero: it trained
    for name, tensor in adapted.items():
        if "lora_" not in name:
            assert torch.equal(tensor, base[name.replace(".base_layer.", ".")]), name  # the base stays frozen
    assert PeftConfig.from_pretrained(str(tmp_path / "adapter")).peft_type == "LORA"
