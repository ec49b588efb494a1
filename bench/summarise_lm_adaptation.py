"""Table and plot of the SmolLM2 adaptation study (sweeps/lm_adaptation.yaml) from its multirun folder.

    python bench/summarise_lm_adaptation.py multirun/lm_adaptation/<date>/<time> [--out docs/results/lm/adaptation]

One row per task and method: trainable parameters (count and share), lm-eval accuracy of the task before (the
step-0 eval: the base, zero-shot) and after fine-tuning, the median step time and labelled (answer) tokens/s (the
first log window, which holds start-up, left out), peak GPU memory. Writes adaptation.md, adaptation.json and
adaptation.png (accuracy after fine-tuning against trainable parameters, one panel per task, the zero-shot base as a
line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from athena.report.runs import find_runs, load_run  # noqa: E402

METHODS = ("full", "lora", "ia3", "moe", "poly", "hybrid")


def summarise(folder: Path) -> list[dict]:
    rows = []
    for path in find_runs(folder):
        run = load_run(path)
        config = json.loads((path / "config.json").read_text())
        task = config["data"]["build"]["train_on"]
        acc = run.series(f"eval/{task}/acc")
        counts = run.trainable_params or (None, None)
        samples = run.median("train/samples_per_s")
        rows.append({
            "task": task, "method": "full" if config["adapter"]["name"] == "none" else config["adapter"]["name"],
            "status": run.status, "lr": config["train"]["lr"], "steps": run.last_step,
            "trainable": counts[0], "total": counts[1],
            "acc_before": acc.values[0] if acc and acc.steps[0] == 0 else None,
            "acc_after": acc.values[-1] if acc and acc.steps[-1] > 0 else None,
            "step_ms": 1000 * config["train"]["global_batch_size"] / samples if samples else None,
            "tokens_per_s": run.median("train/tokens_per_s"), "peak_mem_gb": run.maximum("train/peak_mem_gb"),
        })
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(rows, key=lambda r: (r["task"], order.get(r["method"], 99)))


def markdown(rows: list[dict]) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines = ["| task | method | trainable | share | lm-eval acc before | after | step ms | labelled tokens/s "
             "| peak GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = r["trainable"] / r["total"] if r["trainable"] and r["total"] else None
        lines.append(f"| {r['task']} | {r['method']} | {fmt(r['trainable'], ',')} | {fmt(share, '.2%')} | "
                     f"{fmt(r['acc_before'], '.1%')} | **{fmt(r['acc_after'], '.1%')}** | {fmt(r['step_ms'], '.0f')} | "
                     f"{fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['peak_mem_gb'], '.2f')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    from athena.eval.plots import plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task and r["acc_after"] is not None and r["trainable"]]
        for r in mine:
            ax.scatter(r["trainable"], 100 * r["acc_after"], s=40)
            ax.annotate(r["method"], (r["trainable"], 100 * r["acc_after"]), textcoords="offset points", xytext=(4, 4))
        before = [r["acc_before"] for r in rows if r["task"] == task and r["acc_before"] is not None]
        if before:
            ax.axhline(100 * before[0], color="grey", linestyle="--", label="base, zero-shot")
            ax.legend(loc="lower right")
        ax.set(xscale="log", xlabel="trainable parameters", ylabel="lm-eval accuracy after (%)", title=task)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: the multirun folder")
    args = parser.parse_args(argv)
    out = args.out or args.folder
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise(args.folder)
    (out / "adaptation.json").write_text(json.dumps(rows, indent=2))
    (out / "adaptation.md").write_text(markdown(rows))
    plot(rows, out / "adaptation.png")
    print(markdown(rows))
    print(f"wrote {out / 'adaptation.md'}, {out / 'adaptation.json'}, {out / 'adaptation.png'}")


if __name__ == "__main__":
    main()
