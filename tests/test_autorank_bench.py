"""bench/autorank_smollm2.py --toy: the GPU study's harness end to end on a tiny random Llama (CPU, seconds), so the
command the lead runs on the H200 is known to work before it costs device time."""

from __future__ import annotations

import importlib.util
import json

import pytest

from helpers import ROOT


@pytest.mark.usefixtures("one_thread")
def test_the_autorank_study_runs_at_toy_size_and_records_every_method(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("autorank_smollm2", ROOT / "bench" / "autorank_smollm2.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--toy", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "autorank_smollm2.json").read_text())
    budget = report["budget"]["total_rank"]
    assert budget == 8 * 14 and report["budget"]["slots"] == ["L0.attn", "L0.mlp", "L1.attn", "L1.mlp"]
    assert set(report["methods"]) == {"uniform", "importance", "autorank", "random", "adalora"}
    for name, result in report["methods"].items():
        assert 0 <= result["test_acc"] <= 1 and result["val_loss"] > 0, name
        assert name == "adalora" or 0 < result["total_rank"] <= budget, name  # the same budget for every pattern
    assert report["methods"]["uniform"]["total_rank"] == budget  # rank 8 everywhere spends it exactly
    for name in ("autorank", "random"):
        search = report["search"][name]
        assert len(search["values"]) == 4 and search["best_so_far"][-1] == min(search["values"])
    trials = [json.loads(line) for line in (tmp_path / "autorank" / "autorank_trials.jsonl").read_text().splitlines()]
    assert [t["source"] for t in trials] == ["initial", "initial", "gp", "gp"]
    assert {p.name for p in (tmp_path / "report").iterdir()} == {"autorank.md", "autorank_ranks.png",
                                                                "autorank_best_so_far.png"}
    assert "adalora" in capsys.readouterr().out
