"""bench/freezing.py, bench/continual.py and bench/continual_trm.py in --toy mode on the CPU (the studies' plumbing):
every variant and stage runs through the real loop (and lm-eval, for the text studies), and the records hold what
docs/freezing.md and docs/continual.md read. The numbers of a few toy steps mean nothing; their shape and consistency
are checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ONE_THREAD_ENV, ROOT

pytestmark = pytest.mark.slow  # each runs a bench script in a subprocess


def run_bench(script: str, tmp_path, data_root, *args: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--toy", "--data-root", str(data_root),
                           "--out", str(tmp_path), *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **ONE_THREAD_ENV, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_freezing_bench_compares_a_frozen_run_with_a_plain_one(tmp_path, data_root):
    run_bench("freezing.py", tmp_path, data_root, "--steps", "8")
    result = json.loads((tmp_path / "freezing.json").read_text())
    plain, frozen = result["variants"]
    assert (plain["variant"], frozen["variant"]) == ("none", "progressive")
    assert plain["steps"] == frozen["steps"] == 8 and plain["frozen_at_end"] == [] and plain["events"] == []
    # Toy thresholds every layer meets: the whole prefix freezes once the 4-step warm-up is over.
    assert frozen["frozen_at_end"] == frozen["layers"] == ["model.layers.0", "model.layers.1"]
    assert [e["step"] for e in frozen["events"]] == [4, 4] and frozen["trainable_fraction_at_end"] < 1
    for v in (plain, frozen):
        assert v["train_seconds"] > 0 and 0 <= v["accuracy"] <= 1 and v["eval_items"] == {"docstring_name": 16}
    assert "| progressive |" in (tmp_path / "freezing.md").read_text() and (tmp_path / "freezing.png").is_file()


def test_continual_bench_fills_the_accuracy_matrix_with_and_without_rehearsal(tmp_path, data_root):
    run_bench("continual.py", tmp_path, data_root, "--steps", "2", "--limit", "4")
    result = json.loads((tmp_path / "continual.json").read_text())
    assert [v["name"] for v in result["variants"]] == ["no rehearsal", "rehearsal"]
    assert len(result["zero_shot"]) == 3 and len(result["stages"]) == 5  # stage 1 once, then 2 x 2 stages
    plain, replay = result["variants"]
    assert plain["matrix"][0] == replay["matrix"][0]  # the shared first stage
    for variant in result["variants"]:
        matrix = variant["matrix"]
        assert len(matrix) == 3 and all(len(row) == 3 and all(0 <= a <= 1 for a in row) for row in matrix)
        s = variant["summary"]
        assert s["average_accuracy"] == pytest.approx(sum(matrix[2]) / 3)
        assert s["forgetting"] == pytest.approx([max(matrix[0][0], matrix[1][0]) - matrix[2][0],
                                                 matrix[1][1] - matrix[2][1]])
    assert [s["rehearsal"] for s in result["stages"]] == [False, False, False, True, True]
    # The rehearsal stages replayed a quarter of their batches (16 rows: 4 replayed), and the plain ones none.
    for stage in result["stages"][1:]:
        rows = [json.loads(line) for line in open(os.path.join(stage["run_dir"], "metrics.jsonl"))]
        replayed = [r["rehearsal/replayed_fraction"] for r in rows if "rehearsal/replayed_fraction" in r]
        assert replayed == ([0.25] if stage["rehearsal"] else []), stage
    assert "**rehearsal**" in (tmp_path / "continual.md").read_text() and (tmp_path / "continual.png").is_file()


def test_trm_continual_bench_chains_sudoku_to_sudoku_x_and_replays_sudoku(tmp_path, data_root):
    run_bench("continual_trm.py", tmp_path, data_root, "--steps", "4", "--jobs", "2")
    result = json.loads((tmp_path / "continual_trm_toy.json").read_text())
    runs = {r["name"]: r for r in result["runs"]}
    assert set(runs) == {"stage1", "scratch", "stage2_plain", "stage2_rehearsal"}
    stage1_weights = os.path.join(runs["stage1"]["run_dir"], "checkpoints", "last.pt")
    for name, run in runs.items():
        config = json.load(open(os.path.join(run["run_dir"], "config.json")))
        assert config["data"]["name"] == ("sudoku4" if name == "stage1" else "sudoku4_x")
        assert config["init_from"] == (stage1_weights if name.startswith("stage2") else None)
        assert config["train"]["steps"] == 4
        # Scored on both test splits: one evaluate.py record per task, each on its own data.
        for task, accuracy in zip(("sudoku4", "sudoku4_x"), run["accuracy"]):
            scored = json.load(open(os.path.join(run["run_dir"], "eval", f"on_{task}.json")))
            assert scored["data"] == task and scored["exact_accuracy"] == accuracy and 0 <= accuracy <= 1
        rows = [json.loads(line) for line in open(os.path.join(run["run_dir"], "metrics.jsonl"))]
        replayed = [r["rehearsal/replayed_fraction"] for r in rows if "rehearsal/replayed_fraction" in r]
        assert replayed == ([0.25, 0.25] if name == "stage2_rehearsal" else []), name  # 8 of smoke's 32 rows
    plain, replay = result["variants"]
    assert (plain["name"], replay["name"]) == ("no rehearsal", "rehearsal")
    assert plain["matrix"] == [runs["stage1"]["accuracy"], runs["stage2_plain"]["accuracy"]]
    assert replay["matrix"] == [runs["stage1"]["accuracy"], runs["stage2_rehearsal"]["accuracy"]]
    for variant in result["variants"]:
        m = variant["matrix"]
        assert variant["summary"]["forgetting"] == pytest.approx([m[0][0] - m[1][0]])
    assert "from scratch" in (tmp_path / "continual_trm_toy.md").read_text()
    assert (tmp_path / "continual_trm_toy.png").is_file()


def test_prefix_bench_freezes_what_it_says(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench/freezing_prefix.py"), "--size", "tiny", "--steps", "1", "--rounds", "1",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **ONE_THREAD_ENV, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((tmp_path / "freezing_prefix.json").read_text())["records"]
    assert [(r["frozen"], r["layers_frozen"]) for r in records] == [("none", 0), ("prefix", 2), ("suffix", 2),
                                                                    ("prefix", 4), ("suffix", 4)]
    # tiny: hidden 32, vocab 128, 4 decoder layers of 10,304 parameters (4 x 32 x 32 attention + 3 x 32 x 64 FFN +
    # 2 norms of 32); the untied embedding is 4,096; prefix 2 = embedding + layer 0, suffix 2 = the last two layers.
    total, layer, embedding = records[0]["total_params"], 10304, 128 * 32
    assert records[0]["trainable_params"] == total
    assert records[1]["trainable_params"] == total - embedding - layer
    assert records[2]["trainable_params"] == total - 2 * layer
    assert records[3]["trainable_params"] == total - embedding - 3 * layer
    assert all(r["step_ms"] > 0 for r in records)
