"""The benchmark plumbing that CI can check: the FLOP count behind MFU, synthetic data, the wall-clock budget,
and bench/throughput.py end to end at toy size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from athena.data.format import PuzzleDataset
from athena.data.synthetic import build_synthetic
from athena.eval.flops import flops_per_sample_step
from conftest import ROOT, run_script
from tests.test_model_trm import SEQ, VOCAB, make_batch, small_model


@pytest.mark.parametrize("mixer", ["attention", "mlp"])
def test_flop_formula_equals_torch_flop_counter_on_one_supervision_step(mixer):
    """MFU's numerator: the formula must equal the matmul FLOPs torch counts for forward + backward."""
    arch = dict(hidden_size=32, num_heads=4, expansion=2.0, num_layers=2, H_cycles=2, L_cycles=3, puzzle_emb_len=2,
                mixer=mixer)
    model = small_model(mixer=mixer)
    batch = make_batch(4, seed=0)
    with FlopCounterMode(display=False) as counter:
        _, out = model(model.initial_carry(batch), batch)
        out.loss.backward()
    expected = 4 * flops_per_sample_step(arch, SEQ, VOCAB)
    if mixer == "attention":
        # The CPU attention kernel has no FLOP formula registered in torch: take the formula's score/value
        # matmuls (4*L*L*D per layer and application) out, so the rest is compared exactly.
        L, D, applications = 2 + SEQ, 32, 2 * 4 + 2 * 4
        expected -= 4 * 2 * applications * 4 * L * L * D
    # The formula leaves out only the 2-wide halting head (a few thousand FLOPs).
    assert abs(counter.get_total_flops() - expected) / expected < 1e-3


def test_synthetic_dataset_has_the_asked_shape_and_loads(tmp_path):
    build_synthetic(tmp_path, seq_len=12, vocab_size=7, num_train=10, num_test=3, seed=1)
    train = PuzzleDataset(tmp_path, "train")
    assert train.metadata.seq_len == 12 and train.metadata.vocab_size == 7 and len(train) == 10
    inputs = np.load(tmp_path / "train" / "all__inputs.npy")
    assert inputs.shape == (10, 12) and inputs.min() >= 1 and inputs.max() <= 6


def test_max_minutes_stops_training_early_and_still_evaluates(tmp_path, data_root):
    proc = run_script("pretrain.py", "experiment=smoke", "train.steps=100000", "train.max_minutes=0.0001",
                      f"hydra.run.dir={tmp_path}", data_root=data_root)
    final = json.loads((tmp_path / "eval" / "final.json").read_text())
    assert 1 <= final["step"] < 10  # stopped at the first step past the budget, not after 100000
    assert "max_minutes" in proc.stdout + proc.stderr and "exact accuracy" in proc.stdout


def test_throughput_bench_runs_and_records(tmp_path, data_root):
    out = tmp_path / "throughput.json"
    env_overrides = ["arch.hidden_size=32", "arch.num_heads=2", "arch.H_cycles=1", "arch.L_cycles=1",
                     "arch.halt_max_steps=2", "train.compile=false", "train.num_workers=0", f"data_root={data_root}"]
    subprocess.run([sys.executable, str(ROOT / "bench/throughput.py"), "--recipes", "sudoku_att", "--batch", "8",
                    "--warmup", "1", "--steps", "2", "--out", str(out), "--override", *env_overrides],
                   cwd=ROOT, check=True, capture_output=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    [record] = json.loads(out.read_text())
    assert record["impl"] == "athena" and record["recipe"] == "sudoku_att" and record["batch"] == 8
    assert record["samples_per_s"] > 0 and record["step_ms"] > 0 and record["timed_steps"] == 2
    assert torch.isclose(torch.tensor(record["samples_per_s"] * record["step_ms"] / 1000), torch.tensor(8.0), rtol=0.01)


def test_wrapped_weights_evaluate_like_the_checkpoint_they_came_from(tmp_path, data_root):
    """bench/summarise_adaptation.py export-weights then wrap-weights: the bare EMA weights (as the time-to-accuracy
    bench exports them) plus the run's overrides become a checkpoint that evaluate.py scores exactly as the original."""
    run = ["experiment=smoke", "train.steps=6", "train.eval_every=null", "train.checkpoint_every=null"]
    run_script("pretrain.py", *run, f"hydra.run.dir={tmp_path / 'run'}", data_root=data_root)
    env = {**os.environ, "ATHENA_DATA_DIR": str(data_root)}
    tool = [sys.executable, str(ROOT / "bench/summarise_adaptation.py")]
    subprocess.run([*tool, "export-weights", str(tmp_path / "run/checkpoints/last.pt"), str(tmp_path / "weights.pt")],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    subprocess.run([*tool, "wrap-weights", str(tmp_path / "weights.pt"), str(tmp_path / "wrapped.pt"), *run],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    scores = []
    for name, checkpoint in (("original", tmp_path / "run/checkpoints/last.pt"), ("wrapped", tmp_path / "wrapped.pt")):
        run_script("evaluate.py", f"checkpoint={checkpoint}", f"eval.output_dir={tmp_path}", f"eval.name={name}",
                   data_root=data_root)
        result = json.loads((tmp_path / f"{name}.json").read_text())
        scores.append((result["exact_accuracy"], result["token_accuracy"], result["count"]))
    assert scores[0] == scores[1] and scores[0][1] > 0


def run_adapters_bench(tmp_path, *args: str) -> list[dict]:
    """bench/adapters.py --tiny on the CPU with `args`; returns its records."""
    out = tmp_path / "adapters.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/adapters.py"), "--tiny", "--steps", "2", "--out", str(out),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["records"]


def test_adapter_bench_runs_at_toy_size_and_records_every_mode(tmp_path):
    """bench/adapters.py --tiny (CPU): base, peft LoRA and Athena LoRA/moe, each with a train, an unmerged and a
    merged record carrying the fields docs/benchmarks.md reads; ratios are against the base."""
    records = run_adapters_bench(tmp_path, "--only", "base:none,peft:lora,athena:lora,athena:moe")
    keys = {(r["impl"], r["method"], r["mode"]) for r in records}
    for impl, method in [("base", "none"), ("peft", "lora"), ("athena", "lora"), ("athena", "moe")]:
        assert {(impl, method, m) for m in ("train", "infer_unmerged", "infer_merged")} <= keys
    for r in records:
        assert r["step_ms"] > 0 and r["vs_base"] > 0 and r.get("gpu_kernel_ms") is None  # no kernel time on a CPU
    lora = next(r for r in records if r["impl"] == "athena" and r["method"] == "lora" and r["mode"] == "train")
    assert 0 < lora["trainable_params"] < lora["total_params"] and lora["vs_athena_lora_train"] == 1.0
    moe = next(r for r in records if r["method"] == "moe" and r["mode"] == "infer_merged")
    assert "experts" in moe["note"]  # experts cannot merge, and the record says so


def test_adapter_bench_prefill_only_skips_training(tmp_path):
    """--prefill-only (used with CUDA graphs, where compiling the training steps too would not fit a device call)
    records only the two prefill modes, still with ratios against the base."""
    records = run_adapters_bench(tmp_path, "--prefill-only", "--only", "base:none,athena:lora")
    assert sorted((r["impl"], r["mode"]) for r in records) == [
        ("athena", "infer_merged"), ("athena", "infer_unmerged"), ("base", "infer_merged"), ("base", "infer_unmerged")]
    assert all(r["vs_base"] > 0 for r in records)


def test_saved_activations_tally_counts_what_autograd_keeps(tmp_path):
    """bench/saved_activations.py on a toy TRM step: the saved bytes grow with the batch, and the float32 residual
    stream (B, L, hidden) that explains Athena's memory gap to the official TRM shows up in the table."""
    def per_sample_mb(batch):
        proc = subprocess.run([sys.executable, str(ROOT / "bench/saved_activations.py"), "--tiny", "--eager",
                               "--batch", str(batch), "--top", "50"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return float(proc.stdout.split(": ")[1].split(" MB")[0]), proc.stdout

    mb2, _ = per_sample_mb(2)
    mb4, table4 = per_sample_mb(4)
    assert 0 < 2 * mb2 < 4 * mb4  # more samples, more saved bytes in all
    assert "| float32 | (4, 83, 32) |" in table4


def test_time_to_accuracy_compare_draws_the_given_runs(tmp_path):
    """`bench/time_to_accuracy.py --compare LABEL=tta.json ...` puts finished runs' curves on one plot; a missing
    file stops it."""
    files = []
    for name, exact in (("a", [0.0, 0.4, 0.8]), ("b", [0.0, 0.2, 0.7])):
        curve = [dict(minutes=5.0 * (i + 1), step=1000 * (i + 1), exact=e, token=0.9, n=1000) for i, e in enumerate(exact)]
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(curve=curve)))
        files.append(f"{name} run={tmp_path / name}.json")
    script = [sys.executable, str(ROOT / "bench/time_to_accuracy.py"), "--out", str(tmp_path / "out"), "--compare"]
    subprocess.run(script + files, check=True, capture_output=True, cwd=ROOT)
    assert (tmp_path / "out" / "compare.png").stat().st_size > 5000
    missing = subprocess.run(script + [f"c={tmp_path / 'nowhere.json'}"], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode != 0 and missing.stderr.strip().splitlines()[-1].startswith("error: --compare takes")


def test_official_pipeline_maps_eval_steps_to_epochs_and_reads_its_records():
    from bench.official_pipeline import curve, epochs_per_eval, train_speed

    assert epochs_per_eval(1000, total_groups=1000) == 768  # 768 epochs x 1000 groups / batch 768 = 1000 steps
    with pytest.raises(SystemExit, match="pick a multiple of 125 steps"):
        epochs_per_eval(1001, total_groups=1000)
    rows = [dict(time=100.0 + step / 5, step=step, **{"train/lm_loss": 1.0}) for step in range(1, 201)]
    rows.insert(100, {"time": 130.0, "step": 100, "all/exact_accuracy": 0.25, "all/accuracy": 0.8})
    assert train_speed(rows) == pytest.approx(5.0)  # 5 steps/s between consecutive train logs
    assert curve(rows, start=70.0, n_test=5000) == [dict(minutes=1.0, step=100, exact=0.25, token=0.8, n=5000)]


def test_official_pipeline_without_the_reference_code_stops_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench/official_pipeline.py"), "--ref-dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"error: no pretrain.py under --ref-dir {tmp_path}; "
                                                "clone the official TRM repository there"]


def test_memory_at_peak_replay_finds_what_was_live_at_the_peak():
    from bench.memory_at_peak import live_at_peak, report

    MB = 10**6
    ours = [{"filename": "/usr/lib/python3/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"},
            {"filename": "/repo/athena/models/trm.py", "line": 209, "name": "forward"}]
    kernel = [{"filename": "/tmp/torchinductor_root/ab/cab.py", "line": 7, "name": "call"}]
    events = [dict(action="alloc", addr=1, size=100 * MB, frames=ours),
              dict(action="alloc", addr=2, size=50 * MB, frames=kernel),
              dict(action="free_requested", addr=1, size=100 * MB),  # not yet returned: still counts
              dict(action="alloc", addr=3, size=50 * MB, frames=kernel),  # the peak: 1000 + 100 + 50 + 50
              dict(action="free_completed", addr=1, size=100 * MB),
              dict(action="free_completed", addr=9, size=400 * MB),  # a block from before the recording
              dict(action="alloc", addr=4, size=60 * MB, frames=ours)]
    peak, blocks, before = live_at_peak(events, allocated_before=1000 * MB)
    assert peak == 1200 * MB and before == 1000 * MB
    assert blocks == [(100 * MB, "trm.py:209 forward"), (50 * MB, "cab.py:7 call"), (50 * MB, "cab.py:7 call")]
    text = report(peak, blocks, before, "toy")
    assert "| 50.00 | 2 | 0.1000 |" in text and "   0.100 GB  cab.py:7 call (50.0 MB)" in text


@pytest.mark.skipif(not (ROOT / ".ref/official/models").is_dir(),
                    reason="needs the official TRM code in .ref/official (git-ignored, never committed)")
@pytest.mark.parametrize("mixer", ["mlp", "attention"])
def test_athena_computes_the_official_trm_step_for_step(mixer):
    """Same weights, same batch, same seeds: halting, logits, loss and every gradient agree to float32 round-off
    with the official TRM over several deep-supervision steps (bench/compare_official.py)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench/compare_official.py"), "--mixer", mixer, "--steps", "5"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"[compare_official] {mixer}:" in proc.stdout and "same function" in proc.stdout
    assert proc.stdout.count("(same: True)") == 5


def test_fp8_gemm_bench_runs_and_fp8_errors_are_those_of_its_formats(tmp_path):
    """bench/fp8_gemm.py at toy size on the CPU (real torch._scaled_mm): six GEMMs, each FP8 result within the
    rounding error of e4m3/e5m2 operands (a few percent) of the float32 product, and coarser than bf16's."""
    out = tmp_path / "fp8.json"
    subprocess.run([sys.executable, str(ROOT / "bench/fp8_gemm.py"), "--tiny", "--steps", "2", "--out", str(out)],
                   check=True, cwd=ROOT)
    records = json.loads(out.read_text())["records"]
    assert [(r["linear"], r["gemm"]) for r in records] == [
        (lin, op) for lin in ("gate_up", "down") for op in ("fwd", "dgrad", "wgrad")]
    for r in records:
        assert r["rel_err_bf16"] < 0.01 and 0.01 < r["rel_err_fp8"] < 0.1, r  # e4m3: 3 mantissa bits, e5m2: 2
        assert r["per_step_calls"] == (42 if r["gemm"] == "fwd" else 14)
