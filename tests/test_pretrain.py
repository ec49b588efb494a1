"""pretrain.py and evaluate.py end to end, as a user runs them (subprocesses on the CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import last_line_error, run_script

pytestmark = pytest.mark.slow  # end-to-end runs in subprocesses

SMOKE = ("experiment=smoke",)


def assert_trained(run_dir, first="step_10.pt", last="step_20.pt"):
    """The weights and the EMA moved between two checkpoints: the run really took optimizer steps (a run whose
    optimizer never stepped would pass every end-to-end check below with its initial weights)."""
    a = torch.load(run_dir / "checkpoints" / first, weights_only=True)
    b = torch.load(run_dir / "checkpoints" / last, weights_only=True)
    trained = set(a["ema"]) | {"puzzle_embedding.weight"}  # every parameter (the EMA's) + the sparse table; no buffers
    for part in ("model", "ema"):
        names = trained & set(a[part])
        unchanged = sorted(name for name in names if torch.equal(a[part][name], b[part][name]))
        assert not unchanged, f"{part}: unchanged {unchanged}"


def first_train_step(run_dir) -> int:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return min(r["step"] for r in rows if "train/lm_loss" in r)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_root):
    run_dir = tmp_path_factory.mktemp("smoke")
    proc = run_script("pretrain.py", *SMOKE, f"hydra.run.dir={run_dir}", data_root=data_root)
    return run_dir, proc


def test_smoke_run_trains_evaluates_and_saves(smoke_run):
    run_dir, proc = smoke_run
    assert "test set" in proc.stdout and "exact accuracy" in proc.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/lm_loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    for key in ("train/lm_loss", "train/lr", "train/grad_norm", "train/steps", "train/exact_accuracy"):
        assert key in train_rows[-1]
    assert any("eval/exact_accuracy" in r and r["step"] == 10 for r in rows)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["last.pt", "step_10.pt", "step_20.pt"]
    final = json.loads((run_dir / "eval" / "final.json").read_text())
    assert final["step"] == 20 and final["count"] > 0 and len(final["exact_accuracy_by_step"]) == 4
    assert (run_dir / "eval" / "accuracy_by_step.png").stat().st_size > 1000
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 20 and state["config"]["arch"]["hidden_size"] == 32
    assert_trained(run_dir)
    # It learns, even in 20 steps: the token loss falls (a working run: ~1.6 -> ~1.1; a run whose optimizer never
    # steps stays at ~1.6 up to batch noise of ~0.02).
    assert train_rows[-1]["train/lm_loss"] < train_rows[0]["train/lm_loss"] - 0.2, [r["train/lm_loss"] for r in train_rows]


def test_evaluate_reproduces_the_final_training_eval(smoke_run, data_root):
    run_dir, _ = smoke_run
    assert_trained(run_dir)  # so the equality below is about trained weights, not about an untouched init
    proc = run_script("evaluate.py", f"checkpoint={run_dir}/checkpoints/last.pt", "eval.name=again", data_root=data_root)
    assert "exact accuracy" in proc.stdout
    final = json.loads((run_dir / "eval" / "final.json").read_text())
    again = json.loads((run_dir / "eval" / "again.json").read_text())
    for key in ("count", "exact_accuracy", "token_accuracy", "exact_accuracy_by_step", "halt_step_counts"):
        assert again[key] == pytest.approx(final[key], abs=1e-9), key


def test_resumed_run_equals_uninterrupted_run(smoke_run, tmp_path, data_root):
    """Continue from the step-10 checkpoint in a new folder: parameters at step 20 must match exactly."""
    run_dir, _ = smoke_run
    assert_trained(run_dir)  # steps 10 -> 20 change the weights: equality below needs both halves of the run
    run_script("pretrain.py", *SMOKE, f"hydra.run.dir={tmp_path}", f"resume={run_dir}/checkpoints/step_10.pt",
               data_root=data_root)
    # It really resumed (a run from scratch would reproduce the same end state too): from that file, at step 10,
    # and its first logged window is steps 11-15.
    assert f"resumed from {run_dir}/checkpoints/step_10.pt at step 10" in (tmp_path / "pretrain.log").read_text()
    assert first_train_step(tmp_path) == 15
    uninterrupted = torch.load(run_dir / "checkpoints" / "step_20.pt", weights_only=True)
    resumed = torch.load(tmp_path / "checkpoints" / "step_20.pt", weights_only=True)
    for part in ("model", "ema"):
        for name, tensor in uninterrupted[part].items():
            assert torch.equal(tensor, resumed[part][name]), f"{part}.{name} differs after resume"
    assert uninterrupted["batches_consumed"] == resumed["batches_consumed"]


def test_resume_from_a_corrupt_file_is_one_line(tmp_path, data_root):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = run_script("pretrain.py", *SMOKE, f"hydra.run.dir={tmp_path / 'run'}", f"resume={bad}",
                      data_root=data_root, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint") and str(bad) in last


def test_diverging_loss_stops_with_one_line(tmp_path, data_root):
    proc = run_script("pretrain.py", *SMOKE, f"hydra.run.dir={tmp_path}", "train.lr=1e30", "train.grad_clip=null",
                      "train.eval_every=null", "train.checkpoint_every=null", data_root=data_root, check=False,
                      full_errors=False)
    last = last_line_error(proc)
    assert last.startswith("error: train/") and "lower train.lr" in last and "no checkpoint was written yet" in last
    assert last.removeprefix("error: ") in (tmp_path / "pretrain.log").read_text()  # the run's log says why it stopped


def test_a_diverged_run_never_writes_a_non_finite_checkpoint(tmp_path, data_root):
    """Saving every step while the weights blow up: the save that would hold NaNs is refused, every checkpoint on
    disk is finite, and the error names the newest one whose next step's loss was seen finite (and points last.pt at
    it), so resume=auto from it trains on: its next loss is computed from its weights, before any update, whatever
    the new learning rate."""
    diverging = (*SMOKE, "train.checkpoint_every=1", "train.eval_every=null")
    proc = run_script("pretrain.py", *diverging, "train.lr=1e3", f"hydra.run.dir={tmp_path}", data_root=data_root,
                      check=False, full_errors=False)
    last = last_line_error(proc)
    assert "stopped being finite" in last and "which last.pt now points to" in last, last
    named = last.split("last good checkpoint: ")[1].split(",")[0]
    saved = sorted((tmp_path / "checkpoints").glob("*.pt"))
    assert saved, "the run should have saved the steps before it diverged"
    for path in saved:
        state = torch.load(path, weights_only=True)
        for part in ("model", "ema"):
            assert all(torch.isfinite(t).all() for t in state[part].values()), f"{path.name} {part}"
    stopped_at = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert named == str(tmp_path / "checkpoints" / f"step_{stopped_at}.pt")
    run_script("pretrain.py", *diverging, "train.checkpoint_every=null", "train.lr=1e-6", "resume=auto",
               f"train.steps={stopped_at + 1}", f"hydra.run.dir={tmp_path}", data_root=data_root)
    assert f"resumed from {tmp_path}/checkpoints/last.pt at step {stopped_at}" in (tmp_path / "pretrain.log").read_text()
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] == stopped_at + 1


def test_missing_data_files_stop_with_one_line(tmp_path, data_root):
    proc = run_script("pretrain.py", "data=sudoku_extreme_csv", f"data.build.source_dir={tmp_path / 'nowhere'}",
                      f"hydra.run.dir={tmp_path / 'run'}", data_root=data_root, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Sudoku-Extreme CSVs missing") and "nowhere" in last


def test_gradient_accumulation_runs_with_one_carry_per_micro_batch(tmp_path, data_root):
    run_script("pretrain.py", *SMOKE, "train.grad_accum_steps=2", "train.steps=10", f"hydra.run.dir={tmp_path}",
               data_root=data_root)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    carries = state["task"]["carries"]
    assert len(carries) == 2 and carries[0]["z_H"].shape[0] == 16


def test_export_to_safetensors_gives_the_ema_model(smoke_run, tmp_path, data_root):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from athena.training.export import export_safetensors

    run_dir, _ = smoke_run
    out = export_safetensors(run_dir / "checkpoints" / "last.pt", tmp_path / "model.safetensors")
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    exported = load_file(str(out))
    assert set(exported) == set(state["model"])
    for name, tensor in exported.items():
        expected = state["ema"].get(name, state["model"][name])
        assert torch.equal(tensor, expected), name
    # The EMA is not the raw weights (after training they differ), so the check above tells the two apart.
    assert any(not torch.equal(state["ema"][n], state["model"][n]) for n in state["ema"])
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["config"])["arch"]["hidden_size"] == 32


def test_arc_run_and_evaluate_report_pass_at_k(tmp_path, data_root):
    arc = ("experiment=smoke", "data=arc1", "data.build.max_tasks=3", "data.build.num_aug=2", "arch.mixer=attention",
           "train.steps=4", "train.eval_every=null", "train.checkpoint_every=null")
    run_script("pretrain.py", *arc, f"hydra.run.dir={tmp_path}", data_root=data_root)
    proc = run_script("evaluate.py", f"checkpoint={tmp_path}/checkpoints/last.pt", data_root=data_root)
    assert "ARC pass@1" in proc.stdout
    result = json.loads((tmp_path / "eval" / "test_arc1.json").read_text())
    assert result["num_tasks"] == 3 and 0.0 <= result["pass@1"] <= result["pass@2"] <= 1.0


def test_weights_only_file_resumes_with_a_warning(smoke_run, tmp_path, data_root):
    run_dir, _ = smoke_run
    weights = tmp_path / "weights.pt"
    trained = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    torch.save(trained, weights)
    # One step at a learning rate of 1e-12 moves no weight by more than ~1e-11: what is saved after it is what
    # was loaded (both the weights and the EMA, which starts from them), not a fresh initialisation.
    proc = run_script("pretrain.py", *SMOKE, "train.steps=1", "train.lr=1e-12", "train.puzzle_emb_lr=1e-12",
                      "train.eval_every=null", f"hydra.run.dir={tmp_path / 'run'}", f"resume={weights}",
                      data_root=data_root)
    assert "holds weights only: optimizer, EMA and data position start fresh" in proc.stdout + proc.stderr
    after = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert after["step"] == 1
    for part in ("model", "ema"):
        for name, tensor in after[part].items():
            torch.testing.assert_close(tensor, trained[name], rtol=0, atol=1e-9, msg=f"{part}.{name}")


def test_eval_at_start_scores_the_model_before_any_step(tmp_path, data_root):
    """train.eval_at_start logs an eval at step 0 (the 'before' of an adaptation run): the untrained model's."""
    run_script("pretrain.py", *SMOKE, "train.steps=2", "train.eval_every=null", "train.eval_at_start=true",
               f"hydra.run.dir={tmp_path}", data_root=data_root)
    evals = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "eval/count" in r]
    assert [r["step"] for r in evals] == [0, 2]  # before training, and the final eval
    assert evals[0]["eval/count"] == evals[1]["eval/count"] > 0
