"""python -m athena.report: what a report holds, read back from the files it writes.

Fast tests write run folders by hand (the files pretrain.py writes, with chosen numbers); the slow ones run a real
tiny multirun of pretrain.py (three jobs, the last one diverging) and report on it and on one of its jobs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
from matplotlib.image import imread

from athena.report import write_report
from athena.report.config_view import differences
from athena.report.figures import run_figure_groups
from athena.report.runs import Run
from athena.report.sweep import job_overrides
from helpers import ROOT, composed, last_line_error, run_script, script_env


def report_cli(*args: str, data_root: Path) -> subprocess.CompletedProcess:
    """`python -m athena.report ARGS` as a user runs it (a subprocess in the checkout)."""
    return subprocess.run([sys.executable, "-m", "athena.report", *map(str, args)], cwd=ROOT,
                          env=script_env(data_root), capture_output=True, text=True, timeout=120)


def markdown_table(text: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the Markdown table whose first header cell is `first_header`, as {header: cell}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    headers = [cell.strip() for cell in lines[start].strip("|").split(" | ")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(headers, (cell.strip() for cell in line.strip().strip("|").split(" | ")))))
    return rows


def assert_png_with_content(path: Path) -> None:
    """A readable PNG that is not one flat colour (an empty figure is)."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = imread(path)
    assert pixels.std() > 0.01, f"{path} is blank"


def write_run(folder: Path, rows: list[dict], final: dict | None, config: dict | None = None,
              log: list[str] = (), tail: str = "") -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or {"train": {"global_batch_size": 8, "log_every": 2}}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    (folder / "pretrain.log").write_text("".join(line + "\n" for line in log))
    if final is not None:
        (folder / "eval").mkdir()
        (folder / "eval" / "final.json").write_text(json.dumps(final))
    return folder


# ------------------------------------------------------------------------------------------------ fast


def test_hydra_job_names_give_their_overrides():
    assert job_overrides("3_arch.L_cycles=2,data.sizes=[1,2],train.lr=1e-3") == {
        "arch.L_cycles": "2", "data.sizes": "[1,2]", "train.lr": "1e-3"}
    assert job_overrides("12_+callbacks=[{a:1,b:2}],adapter=lora") == {"+callbacks": "[{a:1,b:2}]", "adapter": "lora"}
    assert job_overrides("lora") == {} and job_overrides("0_") == {} and job_overrides("run_7") == {}


def test_a_language_model_run_gets_every_curve_and_its_numbers(tmp_path):
    """An LM-shaped run (router loss, tokens/s, MFU, GPU memory, perplexity), resumed once (steps 4 and 6 logged
    twice: the later attempt's values are the run's) and killed mid-line at the end."""
    rows = [
        {"step": 2, "time": 1000.0, "train/loss": 5.0, "train/router_loss": 0.30, "train/lr": 1e-4,
         "train/grad_norm": 2.0, "train/samples_per_s": 16.0, "train/tokens_per_s": 512.0, "train/mfu": 0.10,
         "train/peak_mem_gb": 1.5, "train/epoch": 0.1},
        {"step": 4, "time": 1002.0, "train/loss": 4.0, "train/router_loss": 0.20, "train/lr": 2e-4,
         "train/grad_norm": 1.5, "train/samples_per_s": 20.0, "train/tokens_per_s": 640.0, "train/mfu": 0.12,
         "train/peak_mem_gb": 2.5, "train/epoch": 0.2},
        {"step": 4, "time": 1003.0, "eval/perplexity": 90.0, "eval/count": 64},
        {"step": 6, "time": 1004.0, "train/loss": 3.5, "train/router_loss": 0.15, "train/lr": 3e-4,
         "train/grad_norm": 1.2, "train/samples_per_s": 30.0, "train/tokens_per_s": 960.0, "train/mfu": 0.20,
         "train/peak_mem_gb": 2.0, "train/epoch": 0.3},
        # resumed from the step-2 checkpoint: steps 4 and 6 again
        {"step": 4, "time": 1008.0, "train/loss": 3.9, "train/router_loss": 0.21, "train/lr": 2e-4,
         "train/grad_norm": 1.4, "train/samples_per_s": 22.0, "train/tokens_per_s": 704.0, "train/mfu": 0.13,
         "train/peak_mem_gb": 2.4, "train/epoch": 0.2},
        {"step": 6, "time": 1010.0, "train/loss": 3.0, "train/router_loss": 0.10, "train/lr": 3e-4,
         "train/grad_norm": 1.0, "train/samples_per_s": 24.0, "train/tokens_per_s": 768.0, "train/mfu": 0.15,
         "train/peak_mem_gb": 2.2, "train/epoch": 0.3},
        {"step": 6, "time": 1011.0, "eval/perplexity": 40.0, "eval/count": 64},
        {"step": 6, "time": 1012.0, "eval/samples": "/somewhere/samples.png"},  # an image row: a path, not a number
    ]
    run_dir = write_run(tmp_path / "lm", rows, final={"step": 6, "perplexity": 40.0, "count": 64},
                        tail='{"step": 8, "time": 10')
    run = Run.load(run_dir)
    groups = {stem: keys for stem, _, keys in run_figure_groups(run)}
    assert groups == {"loss": ["train/loss", "train/router_loss"], "optimizer": ["train/lr", "train/grad_norm"],
                      "throughput": ["train/samples_per_s", "train/tokens_per_s", "train/mfu"],
                      "memory": ["train/peak_mem_gb"], "eval": ["eval/perplexity"]}
    loss = run.series("train/loss")
    assert (loss.steps, loss.values) == ([2, 4, 6], [5.0, 3.9, 3.0])  # the resumed attempt's steps 4 and 6
    assert run.unreadable_lines == 1 and run.resumed and run.status == "finished"
    # first window: steps 1-2 at 16 samples/s of 8 = 1 s before its row at t=1000; last row at t=1012
    assert run.wall_seconds == pytest.approx(13.0)

    written = write_report(run_dir)
    out = run_dir / "report"
    assert written == [out / f"{stem}.png" for stem in groups] + [out / "report.md"]
    for png in written[:-1]:
        assert_png_with_content(png)
    text = (out / "report.md").read_text()
    lines = text.splitlines()
    assert "| train/peak_mem_gb (max) | 2.4 |" in lines  # the resumed attempt's max; 2.5 was the discarded step 4
    assert "| tokens/s (median of log windows) | 704 |" in lines  # median of 512, 704, 768
    assert "| MFU (median of log windows) | 13.00% |" in lines
    assert "| train/loss first → last | 5 → 3 |" in lines
    assert "| wall time | 13.0 s (first training step to last metric) |" in lines
    assert "| perplexity | 40 |" in lines
    assert "| unreadable metrics lines | 1 (skipped; a run killed mid-line) |" in lines
    for stem in groups:
        assert f"]({stem}.png)" in text


def test_differences_from_the_defaults_are_the_overridden_keys():
    config = composed("train.lr=0.005", "arch.hidden_size=48", "seed=3")
    from athena.config import validate_config

    resolved = validate_config(config).resolved()
    resolved["task"]["chunk"] = 4  # a knob of this run's task that the default task does not have
    resolved["data_root"] = "/scratch/elsewhere"  # where this machine caches data: not an experiment's choice
    changed = differences(resolved)
    assert {key: (default, ours) for key, default, ours in changed} == {
        "train.lr": ("0.002", "0.005"), "optimizer.model.lr": ("0.002", "0.005"),
        "arch.hidden_size": ("64", "48"), "seed": ("0", "3"), "task.chunk": ("-", "4")}


def test_a_sweep_is_sorted_by_the_chosen_metric_and_lists_its_failed_job(tmp_path):
    sweep = tmp_path / "sweep"
    accuracy = {"0_adapter=lora,train.lr=0.1": 0.5, "1_adapter=lora,train.lr=0.2": 0.9,
                "2_adapter=lora,train.lr=0.3": 0.7}
    for job, acc in accuracy.items():
        write_run(sweep / job, [{"step": 2, "time": 1.0, "train/loss": 1 - acc}], final={"step": 2, "accuracy": acc})
    write_run(sweep / "3_adapter=lora,train.lr=0.4", [{"step": 1, "time": 1.0, "train/loss": 2.0}], final=None,
              log=["step 1 ok", "CUDA out of memory"])  # failed after its first log step
    write_run(sweep / "4_adapter=lora,train.lr=0.5", [{"step": 1, "time": 1.0, "train/loss": float("nan")}],
              final=None)  # diverged: NaN sorts nowhere, it goes last

    write_report(sweep, sort="eval/accuracy")
    table = markdown_table((sweep / "report" / "report.md").read_text(), "job")
    assert [(r["train.lr"], r["eval/accuracy"], r["status"]) for r in table] == [
        ("0.2", "90.00%", "finished"), ("0.3", "70.00%", "finished"), ("0.1", "50.00%", "finished"),
        ("0.4", "–", "failed"), ("0.5", "–", "failed")]
    assert "adapter" not in table[0]  # the same in every job: in the header, not a column

    write_report(sweep, sort="train/loss")  # a loss: lowest first unless told
    assert [r["train.lr"] for r in markdown_table((sweep / "report" / "report.md").read_text(), "job")] == [
        "0.2", "0.3", "0.1", "0.4", "0.5"]
    write_report(sweep, sort="train.lr", order="desc")
    text = (sweep / "report" / "report.md").read_text()
    assert [(r["train.lr"], r["status"], r["step"]) for r in markdown_table(text, "job")] == [
        ("0.5", "failed", "1"), ("0.4", "failed", "1"), ("0.3", "finished", "2"), ("0.2", "finished", "2"),
        ("0.1", "finished", "2")]
    failed = text.split("## Failed jobs", 1)[1]
    assert "3_adapter=lora,train.lr=0.4" in failed and "CUDA out of memory" in failed
    assert "Shared by every job: `adapter=lora`" in text


def test_jobs_without_overrides_in_their_names_compare_by_what_their_configs_change(tmp_path):
    """A study whose folders are named by method (sweeps/: `lora`, `ia3`): the varying config keys are the columns,
    one per pattern (the optimizer's lr follows train.lr: one column)."""
    for name, lr, adapter in (("ia3", 0.01, "ia3"), ("lora", 0.001, "lora")):
        config = {"train": {"lr": lr, "steps": 4}, "optimizer": {"model": {"lr": lr}}, "adapter": {"name": adapter}}
        write_run(tmp_path / name, [{"step": 4, "time": 1.0, "train/loss": 1.0}], final={"accuracy": 0.5},
                  config=config)
    write_report(tmp_path)
    table = markdown_table((tmp_path / "report" / "report.md").read_text(), "job")
    assert [(r["job"].split("]")[0], r["train.lr"], r["adapter.name"]) for r in table] == [
        ("[ia3", "0.01", "ia3"), ("[lora", "0.001", "lora")]
    assert "optimizer.model.lr" not in table[0] and "train.steps" not in table[0]


def test_bad_input_ends_in_one_line(tmp_path, data_root):
    empty_run = write_run(tmp_path / "empty_run", [], final=None)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    cases = {tmp_path / "missing": "is not a folder", lonely: "is neither a run folder",
             empty_run: "holds no metrics rows"}
    for folder, reason in cases.items():
        line = last_line_error(report_cli(folder, data_root=data_root))
        assert reason in line and str(folder) in line, line
    ok = write_run(tmp_path / "sweep" / "0_train.lr=1", [{"step": 1, "train/loss": 1.0}], final={"accuracy": 1.0})
    line = last_line_error(report_cli(ok.parent, "--sort", "eval/acuracy", data_root=data_root))
    assert "no column 'eval/acuracy' to sort by; closest: eval/accuracy" in line, line


# ------------------------------------------------------------------------------------------------ slow: real runs

LRS = ("0.001", "0.002", "1e+30")  # the last one diverges at its first log step: a job that fails


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_root):
    folder = tmp_path_factory.mktemp("multirun")
    proc = run_script("pretrain.py", "-m", "train.lr=1e-3,2e-3,1e30", "experiment=smoke", "train.steps=4",
                      "train.log_every=2", "train.eval_every=2", "train.checkpoint_every=4",
                      f"hydra.sweep.dir={folder}", data_root=data_root, check=False)
    jobs = sorted(p for p in folder.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == [f"{i}_experiment=smoke,train.checkpoint_every=4,train.eval_every=2,"
                                      f"train.log_every=2,train.lr={lr},train.steps=4" for i, lr in enumerate(LRS)]
    assert [(job / "eval" / "final.json").is_file() for job in jobs] == [True, True, False], proc.stderr[-3000:]
    return folder, jobs


@pytest.mark.slow
def test_report_of_a_real_run(sweep, tmp_path, data_root):
    _, jobs = sweep
    proc = report_cli(jobs[0], "--out", tmp_path / "out", data_root=data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [Path(line) for line in proc.stdout.splitlines()]
    out = tmp_path / "out"
    assert printed[-1] == out / "report.md"
    assert {p.name for p in printed} == {"loss.png", "optimizer.png", "throughput.png", "eval.png",
                                         "train_metrics.png", "report.md"}
    assert sorted(out.iterdir()) == sorted(printed)  # it printed every file it wrote, and only those
    for png in printed[:-1]:
        assert_png_with_content(png)
    text = (out / "report.md").read_text()
    final = json.loads((jobs[0] / "eval" / "final.json").read_text())
    evaluation = {row["metric"]: row["value"] for row in markdown_table(text, "metric")}
    for key in ("exact_accuracy", "token_accuracy", "exact_accuracy_at_halt"):
        assert evaluation[key] == f"{100 * final[key]:.2f}%", key
    assert evaluation["count"] == str(final["count"])
    config = {row["part"]: row["setting"] for row in markdown_table(text, "part")}
    assert config["data"].startswith("sudoku4") and "lr 0.001" in config["training"]
    assert config["arch"].startswith("`TinyRecursiveModel`: hidden_size 32")
    assert "| `train.lr` | 0.002 | 0.001 |" in text  # the override, in what differs from the defaults
    images = [unquote(target) for target in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)]
    assert {(out / target).resolve() for target in images} == {
        *(p.resolve() for p in printed[:-1]), *(p.resolve() for p in (jobs[0] / "eval").glob("*.png"))}
    assert not (jobs[0] / "report").exists()  # --out: nothing written into the run


@pytest.mark.slow
def test_report_of_a_real_multirun(sweep, data_root):
    folder, jobs = sweep
    proc = report_cli(folder, "--sort", "eval/token_accuracy", data_root=data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = folder / "report" / "report.md"
    assert proc.stdout.splitlines()[-1] == str(report)
    text = report.read_text()
    table = markdown_table(text, "job")
    finals = [json.loads((job / "eval" / "final.json").read_text()) for job in jobs[:2]]
    expected = sorted(((LRS[i], f"{100 * final['token_accuracy']:.2f}%", "finished") for i, final in enumerate(finals)),
                      key=lambda row: -float(row[1].rstrip("%"))) + [("1e+30", "–", "failed")]
    assert [(r["train.lr"], r["eval/token_accuracy"], r["status"]) for r in table] == expected
    assert "train.steps" not in table[0]  # shared by all jobs
    failed = text.split("## Failed jobs", 1)[1]
    log_tail = (jobs[2] / "pretrain.log").read_text().splitlines()[-1]
    assert jobs[2].name in failed and log_tail in failed
    for job in jobs:  # each job's own report, linked from its row
        assert (folder / "report" / job.name / "report.md").is_file()
    comparison = folder / "report" / "compare_eval_token_accuracy.png"
    assert_png_with_content(comparison)
    assert "](compare_eval_token_accuracy.png)" in text
