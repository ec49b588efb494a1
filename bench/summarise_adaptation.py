"""The TRM adaptation study (sweeps/adaptation_trm.yaml): a table and a plot from its multirun folder.

    python bench/summarise_adaptation.py summary SWEEP_DIR [SWEEP_DIR ...] [--zero-shot EVAL_JSON] [--out DIR]
        every job folder under SWEEP_DIR (config.json, eval/final.json, metrics.jsonl, pretrain.log) -> one record
        per method {method, trainable_params, total_params, trainable_pct, test exact / token accuracy, n,
        peak_mem_gb, step_ms, steps, lr, adapter, device}; --zero-shot adds the reference row from an evaluate.py
        result (the base on the new task, no training). Writes to --out (default: the first SWEEP_DIR)
        adaptation_trm.jsonl (the records), adaptation_trm.md (the table, also printed), adaptation_trm.png (test
        accuracy vs trainable parameters) and adaptation_runs/<method>.json + <method>.jsonl (each record and the
        run's metrics), so `--out docs/results/adaptation/<name>` is a whole record.
    python bench/summarise_adaptation.py export-weights CHECKPOINT OUT.pt
        an Athena checkpoint -> its weights alone as a bare state dict (EMA where present): small enough to
        carry to another machine (init_from takes it as it is)
    python bench/summarise_adaptation.py wrap-weights WEIGHTS OUT.pt -- OVERRIDES...
        a bare state dict (e.g. the EMA weights exported by bench/gpu_time_to_accuracy.sh) -> an Athena
        checkpoint whose run config is composed from OVERRIDES (those of the run that trained the weights), so
        evaluate.py and init_from treat it like any checkpoint; the weights serve as raw and EMA weights

A job's method is its adapter (full fine-tuning: adapter none). step_ms is the median over the logged windows after
the first (which holds start-up and compilation) of 1000 x global_batch_size / samples_per_s, i.e. one whole
optimizer step; peak_mem_gb is the CUDA peak (max_memory_allocated), null on a CPU. A job folder without
eval/final.json (a failed or unfinished run) is named on stderr and left out.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

NAMES = {"base_zero_shot": "base, no adaptation", "full": "full fine-tuning", "lora": "LoRA", "ia3": "IA3",
         "moe": "MoE (4 experts, top-2)", "poly": "PolyAdapter (LoRA+IA3+MoE)",
         "hybrid": "hybrid (LoRA attn + bottleneck FFN)"}
ORDER = list(NAMES)  # the table's rows


def method_of(config: dict) -> str:
    return "full" if config["adapter"]["name"] == "none" else config["adapter"]["name"]


def job_folders(sweep_dirs: list[Path]) -> list[Path]:
    """The run folders of one or more multiruns: every folder under them holding a config.json."""
    folders = sorted({p.parent for d in sweep_dirs for p in d.rglob("config.json")})
    if not folders:
        sys.exit(f"error: no run folder (one with config.json) under {' '.join(map(str, sweep_dirs))}")
    return folders


def collect_run(run_dir: Path) -> dict:
    config = json.loads((run_dir / "config.json").read_text())
    method = method_of(config)
    final = json.loads((run_dir / "eval" / "final.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    batch = config["train"]["global_batch_size"]
    speeds = [r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r]
    windows = speeds[1:] or speeds
    memory = [r["train/peak_mem_gb"] for r in rows if "train/peak_mem_gb" in r]
    log = (run_dir / "pretrain.log").read_text() if (run_dir / "pretrain.log").exists() else ""
    match = re.findall(r"trainable parameters: (\d+) of (\d+)", log)
    trainable, total = (int(match[-1][0]), int(match[-1][1])) if match else (None, None)
    device = re.findall(r"device (\S+) \((\w+)\)", log)
    return {
        "method": method, "trainable_params": trainable, "total_params": total,
        "trainable_pct": 100.0 * trainable / total if total else None,
        "test_exact_accuracy": final["exact_accuracy"], "test_token_accuracy": final["token_accuracy"],
        "test_count": final["count"], "peak_mem_gb": max(memory) if memory else None,
        "step_ms": 1000.0 * batch / statistics.median(windows) if windows else None,
        "steps": final.get("step"), "global_batch_size": batch, "lr": config["train"]["lr"],
        "adapter": config["adapter"], "data": config["data"]["name"], "init_from": config.get("init_from"),
        "device": "/".join(device[-1]) if device else None,
    }


def collect_eval(method: str, path: Path) -> dict:
    result = json.loads(path.read_text())
    return {"method": method, "trainable_params": 0, "total_params": None, "trainable_pct": 0.0,
            "test_exact_accuracy": result["exact_accuracy"], "test_token_accuracy": result["token_accuracy"],
            "test_count": result["count"], "peak_mem_gb": None, "step_ms": None, "steps": 0,
            "data": result.get("data"), "init_from": result.get("checkpoint")}


def export_weights(checkpoint: Path, out: Path) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from athena.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**state["model"], **(state.get("ema") or {})}, out)  # the EMA weights are the ones evaluated


def wrap_weights(weights: Path, out: Path, overrides: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from athena.config import compose_config, validate_config
    from athena.checkpoint import FORMAT, atomic_save, load_checkpoint

    config = compose_config(overrides)
    validate_config(config)
    state = load_checkpoint(weights)
    if state["format"] != "weights-only":
        sys.exit(f"error: {weights} is already an Athena checkpoint; use it as is")
    out.parent.mkdir(parents=True, exist_ok=True)
    # The same tensors as raw and EMA weights: torch.save stores them once.
    atomic_save({"format": FORMAT, "config": config, "model": state["model"], "ema": state["model"], "step": None}, out)
    print(f"wrote {out} ({len(state['model'])} tensors, config from {' '.join(overrides)})")


def _fmt(value, pattern: str, missing: str = "-") -> str:
    return missing if value is None else pattern.format(value)


def table(records: list[dict]) -> str:
    lines = ["| method | trainable params | trainable % | test exact acc | test token acc | n | peak mem | step ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(
            f"| {NAMES.get(r['method'], r['method'])} | {_fmt(r['trainable_params'], '{:,}')} | "
            f"{_fmt(r['trainable_pct'], '{:.2f}%')} | {100 * r['test_exact_accuracy']:.2f}% | "
            f"{100 * r['test_token_accuracy']:.2f}% | {r['test_count']} | {_fmt(r['peak_mem_gb'], '{:.1f} GB')} | "
            f"{_fmt(r['step_ms'], '{:.0f}')} |")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    trained = [r for r in records if r["trainable_params"]]
    for ax, key, label in ((axes[0], "test_exact_accuracy", "test exact accuracy (%)"),
                           (axes[1], "test_token_accuracy", "test token accuracy (%)")):
        for r in trained:
            ax.scatter(r["trainable_params"], 100 * r[key], s=40)
            ax.annotate(r["method"], (r["trainable_params"], 100 * r[key]), textcoords="offset points", xytext=(5, 4),
                        fontsize=9)
        for r in records:
            if not r["trainable_params"]:
                ax.axhline(100 * r[key], color="gray", linestyle="--", linewidth=1, label=NAMES.get(r["method"]))
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if any(not r["trainable_params"] for r in records):
            ax.legend(fontsize=8)
    data = next((r.get("data") for r in trained if r.get("data")), "")
    fig.suptitle(f"TRM adapted to {data}: accuracy vs trainable parameters", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(sweep_dirs: list[Path], zero_shot: Path | None, out: Path) -> list[dict]:
    records = [collect_eval("base_zero_shot", zero_shot)] if zero_shot else []
    metrics = {}
    for folder in job_folders(sweep_dirs):
        if not (folder / "eval" / "final.json").is_file():
            print(f"warning: {folder} has no eval/final.json (failed or unfinished, see its pretrain.log): left out",
                  file=sys.stderr)
            continue
        record = collect_run(folder)
        if any(r["method"] == record["method"] for r in records):
            sys.exit(f"error: two runs of method {record['method']} (the second in {folder}); summarise one study")
        records.append(record)
        metrics[record["method"]] = folder / "metrics.jsonl"
    if not records:
        sys.exit(f"error: no finished run under {' '.join(map(str, sweep_dirs))}")
    records.sort(key=lambda r: ORDER.index(r["method"]) if r["method"] in ORDER else len(ORDER))
    runs = out / "adaptation_runs"
    runs.mkdir(parents=True, exist_ok=True)
    for r in records:
        (runs / f"{r['method']}.json").write_text(json.dumps(r) + "\n")
        if r["method"] in metrics:
            shutil.copyfile(metrics[r["method"]], runs / f"{r['method']}.jsonl")
    (out / "adaptation_trm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "adaptation_trm.md").write_text(table(records) + "\n")
    plot(records, out / "adaptation_trm.png")
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary")
    s.add_argument("sweep_dirs", type=Path, nargs="+")
    s.add_argument("--zero-shot", type=Path, help="evaluate.py's result for the base on the new task")
    s.add_argument("--out", type=Path, help="where the summary goes (default: the first sweep folder)")
    x = sub.add_parser("export-weights")
    x.add_argument("checkpoint", type=Path)
    x.add_argument("out", type=Path)
    w = sub.add_parser("wrap-weights")
    w.add_argument("weights", type=Path)
    w.add_argument("out", type=Path)
    w.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.command == "export-weights":
        export_weights(args.checkpoint, args.out)
    elif args.command == "wrap-weights":
        wrap_weights(args.weights, args.out, args.overrides)
    else:
        records = summarise(args.sweep_dirs, args.zero_shot, args.out or args.sweep_dirs[0])
        print(table(records))


if __name__ == "__main__":
    main()
