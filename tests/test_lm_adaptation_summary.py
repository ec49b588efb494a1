"""bench/summarise_lm_adaptation.py on the kept SmolLM2 study (docs/results/lm/study_h100_2026-12-05, the run folders'
configs, metrics and lm-eval results without checkpoints): every number of its table traces to a run's own files,
and the committed table is what the script makes from them today."""

import json
import subprocess
import sys

from helpers import ROOT

STUDY = ROOT / "docs" / "results" / "lm" / "study_h100_2026-12-05"


def test_summary_rows_come_from_each_runs_own_files(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "bench" / "summarise_lm_adaptation.py"), str(STUDY), "--out",
                    str(tmp_path)], check=True, capture_output=True, text=True, timeout=120)
    rows = json.loads((tmp_path / "adaptation.json").read_text())
    assert {(r["task"], r["method"]) for r in rows} == {
        (task, method) for task in ("fortune_topics", "wordnet_gloss")
        for method in ("full", "lora", "ia3", "moe", "poly", "hybrid")}
    for row in rows:
        folder = STUDY / f"sft_{row['task']}" / row["method"]
        final = json.loads((folder / "eval" / "final.json").read_text())
        assert row["acc_after"] == final["tasks"][row["task"]]["acc"] and row["steps"] == final["step"] == 300
        first = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])
        assert first["step"] == 0 and row["acc_before"] == first[f"eval/{row['task']}/acc"]
        assert f"trainable parameters: {row['trainable']} of {row['total']}" in (folder / "pretrain.log").read_text()
        assert (row["trainable"] == row["total"]) == (row["method"] == "full")
    # the committed table and its numbers are today's output on the same files
    assert (tmp_path / "adaptation.md").read_text() == (STUDY / "adaptation.md").read_text()
    assert rows == json.loads((STUDY / "adaptation.json").read_text())
