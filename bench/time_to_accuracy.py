"""Time to accuracy: the paper's Sudoku recipe on our generated hard 9x9 set for a fixed wall-clock budget.

    python bench/time_to_accuracy.py --minutes 20 --out docs/results/time_to_accuracy/athena
    python bench/time_to_accuracy.py --compare "bf16 stream=docs/results/time_to_accuracy/athena_clipped_2026-11-23/tta.json" \
        "fp32 stream=docs/results/time_to_accuracy/athena_fp32_stream_2026-11-22/tta.json" \
        --out docs/results/time_to_accuracy/athena_clipped_2026-11-23   # curves on one plot

One continuous `pretrain.py experiment=sudoku_extreme_1k` run (TRM-MLP, batch 768, bf16, compiled) stopped by
`train.max_minutes`; it evaluates exact accuracy on a fixed subsample of the test split every --eval-every steps
(evaluation time counts against the budget) and on the whole test split at the end. The clock starts when
pretrain.py is launched (start-up and compilation included); building the dataset happens before and is timed
separately. Writes tta.json (accuracy over minutes), tta.png and the run's metrics.jsonl under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def curve(metrics: Path, start: float) -> list[dict]:
    """[{minutes, step, exact, token, n, final}] for every eval record of a metrics.jsonl."""
    points = []
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "eval/exact_accuracy" in row:
            points.append(dict(minutes=round((row["time"] - start) / 60, 2), step=row["step"],
                               exact=row["eval/exact_accuracy"], token=row["eval/token_accuracy"],
                               n=row.get("eval/count")))
    if points:
        points[-1]["final"] = True  # the full-test-split eval after the budget
    return points


LAUNCH_CLOCK = "wall-clock minutes since launch (start-up, compilation and evals included)"


def draw(series: list[tuple[str, str, list[dict], str]], path: Path, ylabel: str, title: str = "",
         xlabel: str = LAUNCH_CLOCK) -> None:
    """Accuracy (%) over minutes: one line per (label, style, points, key) with key "exact" or "token"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, style, points, key in series:
        ax.plot([p["minutes"] for p in points], [100 * p[key] for p in points], style, label=label)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(points: list[dict], path: Path, title: str, xlabel: str = LAUNCH_CLOCK) -> None:
    """One run: exact and token accuracy."""
    draw([("exact (puzzle solved)", "o-", points, "exact"), ("token (cell right)", "s--", points, "token")],
         path, "test accuracy (%)", title, xlabel)


def plot_compare(runs: list[tuple[str, list[dict]]], path: Path) -> None:
    """Exact accuracy over minutes of several runs on one axis (e.g. before and after a speed change)."""
    draw([(f"{label}: {100 * p[-1]['exact']:.1f}% at {p[-1]['minutes']:.1f} min (step {p[-1]['step']})", "o-", p,
           "exact") for label, p in runs], path, "test exact accuracy (%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget (train.max_minutes)")
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--eval-examples", type=int, default=1000)
    parser.add_argument("--run-dir", type=Path, default=ROOT / "outputs/time_to_accuracy")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/time_to_accuracy/athena")
    parser.add_argument("--replot", type=Path, default=None, metavar="METRICS_JSONL",
                        help="only redraw tta.json/tta.png from a run's metrics.jsonl, timed from its first record "
                             "(for a run whose launcher was cut off before it wrote tta.json)")
    parser.add_argument("--compare", nargs="+", default=None, metavar="LABEL=TTA_JSON",
                        help="only draw the exact-accuracy curves of finished runs on one plot, --out/compare.png")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (e.g. arch=athena_trm)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.compare:
        pairs = [item.split("=", 1) for item in args.compare]
        for pair in pairs:
            if len(pair) != 2 or not Path(pair[1]).is_file():
                sys.exit(f"error: --compare takes LABEL=PATH of a finished run's tta.json; got {'='.join(pair)!r}")
        runs = [(label, json.loads(Path(file).read_text())["curve"]) for label, file in pairs]
        plot_compare(runs, args.out / "compare.png")
        print(f"[tta] wrote {args.out / 'compare.png'}")
        return
    if args.replot:
        rows = [json.loads(line) for line in args.replot.read_text().splitlines() if line.strip()]
        points = curve(args.replot, rows[0]["time"])
        points[-1].pop("final", None)  # a cut-off run has no full-split eval at the end
        (args.out / "tta.json").write_text(json.dumps(dict(clock=f"minutes since the first training log (step "
                                                           f"{rows[0]['step']})", curve=points), indent=1) + "\n")
        best = max(points, key=lambda p: p["exact"])
        plot(points, args.out / "tta.png", f"TRM-MLP, generated hard 9x9 Sudoku: {100 * best['exact']:.1f}% exact "
             f"at {best['minutes']:.1f} min (n={best['n']})",
             xlabel=f"wall-clock minutes since the first training log (step {rows[0]['step']}), evals included")
        return

    overrides = ["experiment=sudoku_extreme_1k", "train.epochs=null", "train.steps=1000000",
                 f"train.max_minutes={args.minutes}", f"train.eval_every={args.eval_every}",
                 f"train.eval_examples={args.eval_examples}", "train.checkpoint_every=null", *args.overrides]

    from athena.config import compose_config, validate_config
    from athena.data.build import ensure_dataset

    cfg = validate_config(compose_config(overrides))
    build_start = time.time()
    ensure_dataset(cfg.dataset_dir(), dict(cfg.data.build))
    build_s = time.time() - build_start

    start = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *overrides, f"hydra.run.dir={args.run_dir}"],
                          cwd=ROOT, env=env)
    total_s = time.time() - start
    metrics = args.run_dir / "metrics.jsonl"
    points = curve(metrics, start) if metrics.is_file() else []
    summary = dict(overrides=overrides, returncode=proc.returncode, data_build_s=round(build_s, 1),
                   wall_clock_s=round(total_s, 1), curve=points)
    (args.out / "tta.json").write_text(json.dumps(summary, indent=1) + "\n")
    if metrics.is_file():
        (args.out / "metrics.jsonl").write_text(metrics.read_text())
    if points:
        final = points[-1]
        plot(points, args.out / "tta.png", f"{cfg.arch.mixer} TRM, {cfg.data.name}: {100 * final['exact']:.1f}% exact "
             f"after {final['minutes']:.1f} min (n={final['n']})")
        print(f"[tta] {json.dumps(final)}; data build {build_s:.0f} s; wall clock {total_s / 60:.1f} min")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
