"""The TRM adaptation study (bench/adaptation_trm.sh): one JSON line per method, then a table and a plot.

    python bench/summarise_adaptation.py collect METHOD RUN_DIR >> $OUT/adaptation_trm.jsonl
        a pretrain.py run folder -> {method, trainable_params, total_params, trainable_pct, test exact / token
        accuracy, n, peak_mem_gb, step_ms, steps, lr, device}
    python bench/summarise_adaptation.py collect-eval METHOD EVAL_JSON >> $OUT/adaptation_trm.jsonl
        an evaluate.py result (the base model on the new task, no training) -> the same keys, 0 trainable
    python bench/summarise_adaptation.py table $OUT/adaptation_trm.jsonl [--md FILE] [--png FILE]
        markdown table (stdout and --md) and the test-accuracy vs trainable-parameters plot (--png)
    python bench/summarise_adaptation.py export-weights CHECKPOINT OUT.pt
        an Athena checkpoint -> its weights alone as a bare state dict (EMA where present): small enough to
        carry to another machine
    python bench/summarise_adaptation.py wrap-weights WEIGHTS OUT.pt -- OVERRIDES...
        a bare state dict (e.g. the EMA weights exported by bench/gpu_time_to_accuracy.sh) -> an Athena
        checkpoint whose run config is composed from OVERRIDES (those of the run that trained the weights), so
        evaluate.py and init_from treat it like any checkpoint; the weights serve as raw and EMA weights

step_ms is the median over the logged windows after the first (which holds start-up and compilation) of
1000 x global_batch_size / samples_per_s, i.e. one whole optimizer step; peak_mem_gb is the CUDA peak
(max_memory_allocated), null on a CPU.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

NAMES = {"base_zero_shot": "base, no adaptation", "full": "full fine-tuning", "lora": "LoRA", "ia3": "IA3",
         "moe": "MoE (4 experts, top-2)", "poly": "PolyAdapter (LoRA+IA3+MoE)",
         "hybrid": "hybrid (LoRA attn + bottleneck FFN)"}


def collect_run(method: str, run_dir: Path) -> dict:
    config = json.loads((run_dir / "config.json").read_text())
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect")
    c.add_argument("method")
    c.add_argument("run_dir", type=Path)
    e = sub.add_parser("collect-eval")
    e.add_argument("method")
    e.add_argument("eval_json", type=Path)
    t = sub.add_parser("table")
    t.add_argument("jsonl", type=Path)
    t.add_argument("--md", type=Path)
    t.add_argument("--png", type=Path)
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
    elif args.command == "collect":
        print(json.dumps(collect_run(args.method, args.run_dir)))
    elif args.command == "collect-eval":
        print(json.dumps(collect_eval(args.method, args.eval_json)))
    else:
        records = [json.loads(line) for line in args.jsonl.read_text().splitlines() if line.strip()]
        if not records:
            sys.exit(f"error: {args.jsonl} holds no records")
        text = table(records)
        print(text)
        if args.md:
            args.md.write_text(text + "\n")
        if args.png:
            plot(records, args.png)


if __name__ == "__main__":
    main()
