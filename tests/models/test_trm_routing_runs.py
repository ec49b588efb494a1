"""arch.ffn_capacity end to end: the FLOP count of bench/trm_capacity.py against torch's, the capacity sweep as a
Hydra multirun (sweeps/capacity_trm_toy.yaml) and the study script's --toy mode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import ROOT, composed, run_script, script_env

sys.path.insert(0, str(ROOT / "bench"))
import trm_capacity  # noqa: E402  (bench/ is not a package)


def test_bench_arch_is_trm_small():
    arch = composed("arch=trm_small")["arch"]
    assert {k: arch[k] for k in trm_capacity.TRM_SMALL} == trm_capacity.TRM_SMALL


@pytest.mark.parametrize("capacity", [1.0, 0.5, 0.25])
def test_routed_flop_count_equals_torch_flop_counter(capacity):
    """The FLOP ceiling's numbers: the formula must equal the matmul FLOPs torch counts, for a training step
    (forward + backward) and for an eval step (forward, no grad)."""
    from athena.models.trm import TinyRecursiveModel

    arch = dict(trm_capacity.TOY_ARCH, puzzle_emb_len=0)
    seq, vocab, batch_size = 16, 6, 4
    torch.manual_seed(0)
    model = TinyRecursiveModel(vocab, seq, 1, **arch, ffn_capacity=capacity)
    batch = trm_capacity.puzzle_batch(batch_size, seq, vocab, seed=0)
    expected = trm_capacity.routed_flops(arch, seq, vocab, capacity)
    with FlopCounterMode(display=False) as train:
        _, out = model(model.initial_carry(batch), batch)
        out.loss.backward()
    with torch.no_grad(), FlopCounterMode(display=False) as evaluation:
        model(model.initial_carry(batch), batch)
    # Left out by the formula: the 2-wide halting head (a few hundred FLOPs of millions).
    assert abs(train.get_total_flops() - batch_size * expected["train"]) / (batch_size * expected["train"]) < 1e-3
    assert abs(evaluation.get_total_flops() - batch_size * expected["eval"]) / (batch_size * expected["eval"]) < 1e-3


@pytest.mark.slow
def test_capacity_sweep_runs_one_job_per_capacity_through_hydra_multirun(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    run_script("pretrain.py", "-m", "--config-dir", "sweeps", "--config-name", "capacity_trm_toy",
               f"hydra.sweep.dir={sweep}", data_root=data_root)
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["capacity_0.5", "capacity_1.0"]
    for capacity in (1.0, 0.5):
        job = sweep / f"capacity_{capacity}"
        assert json.loads((job / "config.json").read_text())["arch"]["ffn_capacity"] == capacity
        assert json.loads((job / "eval" / "final.json").read_text())["step"] == 4
        logged = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        trained = [m for m in logged if "train/loss" in m]
        if capacity == 1.0:  # the dense model: nothing routed, no router metrics
            assert trained and not any("train/realised_capacity" in m for m in trained)
        else:  # smoke's 4x4 Sudoku: 16 positions, 8 routed in every application
            assert trained and all(m["train/realised_capacity"] == 0.5 and m["train/router_z_loss"] > 0
                                   for m in trained)
        state = torch.load(job / "checkpoints" / "last.pt", weights_only=True)["model"]
        assert any("routed_ffn.router" in k for k in state) == (capacity < 1)


@pytest.mark.slow
def test_study_script_toy_mode_writes_its_table_and_plot(tmp_path, data_root):
    proc = subprocess.run([sys.executable, "bench/trm_capacity.py", "--toy", "--out", str(tmp_path / "out"),
                           "--data-root", str(data_root), "--runs-dir", str(tmp_path / "runs"), "--capacities",
                           "1.0,0.5", "--steps", "2"], cwd=ROOT, env=script_env(data_root), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [report] = (tmp_path / "out").glob("trm_capacity_toy_cpu_*.json")
    result = json.loads(report.read_text())
    assert not result["partial"] and result["device"] == "CPU" and result["threads"] >= 1
    rows = {row["capacity"]: row for row in result["rows"]}
    assert set(rows) == {1.0, 0.5} and rows[1.0]["train_speedup"] == 1.0
    assert rows[0.5]["realised_capacity"] == 0.5 and rows[0.5]["runs"][0]["steps"] == 2
    assert 0.2 < rows[0.5]["flop_share_removed_train"] < 0.3  # toy: FFN = half the block FLOPs, half of it skipped
    for row in rows.values():
        assert row["train_step_ms"] > 0 and row["eval_batch_ms"] > 0 and 0 <= row["runs"][0]["exact_accuracy"] <= 1
    assert result["no_ffn"]["train_flop_ceiling"] > rows[0.5]["train_flop_ceiling"] > 1
    assert report.with_suffix(".md").read_text().count("\n| ") == 3  # the header and two capacities
    assert report.with_suffix(".png").stat().st_size > 10_000


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_study_script_refuses_cuda_without_a_gpu_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "bench/trm_capacity.py", "--toy", "--device", "cuda", "--out",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "error: --device cuda asked for, but no CUDA GPU is visible; use --device cpu"
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_timing_only_record_shows_untrained_cells_as_dashes(tmp_path):
    """A --skip-training record (the H100 timing) has no accuracies or halt steps (NaN in its JSON): its table says
    "-" there, not "nan%", and keeps the timings."""
    stem = "trm_capacity_h100_2026-12-05"
    trm_capacity.write_report(json.loads((ROOT / "docs" / "results" / "adaptive" / f"{stem}.json").read_text()), tmp_path,
                       stem)
    rows = [line for line in (tmp_path / f"{stem}.md").read_text().splitlines() if line.startswith("| 0.5 |")]
    assert len(rows) == 1 and "nan" not in rows[0]
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[2:5] == ["-", "-", "-"] and cells[-1] == "-" and cells[5] == "35.4"
