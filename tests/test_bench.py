"""The benchmark plumbing that CI can check: the FLOP count behind MFU, synthetic data, the wall-clock budget,
and bench/throughput.py end to end at toy size."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from athena.data.format import PuzzleDataset
from athena.data.synthetic import build_synthetic
from athena.eval.flops import flops_per_sample_step
from helpers import ROOT, SEQ, VOCAB, make_batch, run_script, small_model


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


@pytest.mark.slow
def test_max_minutes_stops_training_early_and_still_evaluates(tmp_path, data_root):
    proc = run_script("pretrain.py", "experiment=smoke", "train.steps=100000", "train.max_minutes=0.0001",
                      f"hydra.run.dir={tmp_path}", data_root=data_root)
    final = json.loads((tmp_path / "eval" / "final.json").read_text())
    assert 1 <= final["step"] < 10  # stopped at the first step past the budget, not after 100000
    assert "max_minutes" in proc.stdout + proc.stderr and "exact accuracy" in proc.stdout


# The fields docs/benchmarks.md's throughput table reads from bench/results/throughput.json, and the rest of a record.
THROUGHPUT_FIELDS = {"impl", "recipe", "variant", "device", "torch", "batch", "compiled", "compile_mode",
                     "samples_per_s", "step_ms", "peak_mem_gb", "gflop_per_sample_step", "mfu", "timed_steps"}


@pytest.mark.slow
def test_throughput_bench_times_the_training_steps_it_records(tmp_path, data_root):
    """bench/throughput.py at toy size: the recorded step time is that of the `--steps` training steps after the
    warm-up, bracketed by two independent clocks (the trainer's own window over those steps inside, this test's
    clock around the whole run outside); the FLOPs are the formula's for the config the run resolved."""
    out, runs = tmp_path / "throughput.json", tmp_path / "runs"
    runs.mkdir()
    env_overrides = ["arch.hidden_size=32", "arch.num_heads=2", "arch.H_cycles=1", "arch.L_cycles=1",
                     "arch.halt_max_steps=2", "train.compile=false", "train.num_workers=0", f"data_root={data_root}"]
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "bench/throughput.py"), "--recipes", "sudoku_att", "--batch", "8",
                    "--warmup", "1", "--steps", "2", "--out", str(out), "--override", *env_overrides],
                   cwd=ROOT, check=True, capture_output=True,
                   env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "TMPDIR": str(runs)})  # run folder here
    wall_ms = 1000 * (time.perf_counter() - start)
    [record] = json.loads(out.read_text())
    assert set(record) == THROUGHPUT_FIELDS
    assert (record["impl"], record["recipe"], record["variant"], record["batch"]) == ("athena", "sudoku_att", "", 8)
    assert record["device"] == "cpu" and record["compiled"] is False and record["timed_steps"] == 2
    assert record["mfu"] is None and math.isnan(record["peak_mem_gb"])  # no GPU: no peak FLOP/s, no CUDA memory

    [run] = runs.glob("bench_sudoku_att_*")
    train_logs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]
    assert [r["step"] for r in train_logs] == [1, 3]  # the warm-up step, then exactly the 2 timed steps
    trainer_step_ms = 1000 * 8 / train_logs[-1]["train/samples_per_s"]  # its window: train() entry to the step-3 log
    # The trainer's window lies inside the bench's timed interval (step_ms is rounded to 0.01 ms).
    assert trainer_step_ms <= record["step_ms"] + 0.005
    # Outside that window the bench times only the loop's exit, the signal handlers' restore and a sync (well
    # under 1 ms); 5% + 5 ms allows the OS to deschedule the process there on a loaded machine.
    assert record["step_ms"] <= 1.05 * trainer_step_ms + 5
    assert record["timed_steps"] * record["step_ms"] < wall_ms  # and the timed steps are part of the whole run
    # samples_per_s is rounded to 0.1 and step_ms to 0.01 ms, which moves 8000 / step_ms by 8000 / step_ms^2 * 0.005.
    rounding = 0.05 + 8000 / record["step_ms"] ** 2 * 0.005
    assert record["samples_per_s"] == pytest.approx(8000 / record["step_ms"], abs=rounding)

    arch = json.loads((run / "config.json").read_text())["arch"]
    assert (arch["hidden_size"], arch["H_cycles"], arch["L_cycles"]) == (32, 1, 1)  # the overrides reached the run
    # MFU's numerator: the formula for the resolved config (seq 81, vocab 11), rounded to 0.01 GFLOP in the record.
    assert abs(record["gflop_per_sample_step"] - flops_per_sample_step(arch, 81, 11) / 1e9) <= 0.005


@pytest.mark.slow
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


def test_saved_activations_tally_counts_each_saved_storage_once():
    """bench/saved_activations.py's tally on a function whose saved tensors are known: sin saves x and cos a view of
    it (one storage, counted once), the product saves w and a view of sin(x) (counted as its whole storage)."""
    from bench.saved_activations import tally

    x = torch.randn(3, 5, requires_grad=True)
    w = torch.randn(2, requires_grad=True)

    def fn():
        y = x.sin()
        return (y[:, :2] * w).sum() + x.view(15).cos().sum()

    groups, out = tally(fn)
    assert groups == {("float32", (3, 5)): 3 * 5 * 4, ("float32", (3, 2)): 3 * 5 * 4, ("float32", (2,)): 2 * 4}
    out.backward()  # the hooks hand the saved tensors back unchanged
    torch.testing.assert_close(x.grad, torch.cat([x.cos()[:, :2] * w, torch.zeros(3, 3)], 1) - x.sin())


@pytest.mark.slow
def test_saved_activations_tally_counts_what_autograd_keeps(tmp_path):
    """bench/saved_activations.py on a toy TRM step: what autograd keeps is exactly a fixed part (the bf16 weight
    copies, the same at every batch) plus the same bytes per sample, and the script prints that tally; the float32
    residual stream (B, L, hidden) that explains Athena's memory gap to the official TRM shows up in the table."""
    import argparse

    from bench.saved_activations import athena_step, tally

    def saved(batch):
        args = argparse.Namespace(tiny=True, mixer="mlp", stream_dtype="autocast", adapter="none", ia3_recompute=False,
                                  batch=batch, eager=True)
        step = athena_step(args)
        for _ in range(2):  # as the script: reach the steady carry first
            step().backward()
        groups, loss = tally(step)
        loss.backward()
        return groups

    tallies = {batch: saved(batch) for batch in (2, 4, 6)}
    totals = {batch: sum(groups.values()) for batch, groups in tallies.items()}
    per_sample = (totals[4] - totals[2]) // 2
    assert per_sample > 0 and totals[6] - totals[4] == 2 * per_sample  # exact: bytes are integers
    fixed = {key: nbytes for key, nbytes in tallies[2].items() if all(t.get(key) == nbytes for t in tallies.values())}
    assert fixed and totals[2] - 2 * per_sample == sum(fixed.values())  # the rest is what does not grow with the batch

    proc = subprocess.run([sys.executable, str(ROOT / "bench/saved_activations.py"), "--tiny", "--eager",
                           "--batch", "4", "--top", "50"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = f"batch 4: {totals[4] / 4 / 2**20:.1f} MB saved per sample ({len(tallies[4])} dtype/shape groups)"
    assert printed in proc.stdout
    assert "| float32 | (4, 83, 32) |" in proc.stdout


@pytest.mark.slow
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


@pytest.mark.slow
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
@pytest.mark.slow
def test_athena_computes_the_official_trm_step_for_step(mixer):
    """Same weights, same batch, same seeds: halting, logits, loss and every gradient agree to float32 round-off
    with the official TRM over several deep-supervision steps (bench/compare_official.py)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench/compare_official.py"), "--mixer", mixer, "--steps", "5"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"[compare_official] {mixer}:" in proc.stdout and "same function" in proc.stdout
    assert proc.stdout.count("(same: True)") == 5


@pytest.mark.slow
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
