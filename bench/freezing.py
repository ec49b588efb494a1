"""Progressive freezing on full fine-tuning, where backward dominates: wall-clock and accuracy with and without.

    python bench/freezing.py --data-root DATA --out docs/results/freezing          # SmolLM2, one H200, < 3 min
    python bench/freezing.py --toy --data-root /tmp/data --out /tmp/freezing       # tiny random Llama on a CPU

Full mode: SmolLM2-135M-Instruct fully fine-tuned (experiment=lm_adapt +adaptation=full) on data=sft_wordnet_gloss
(WordNet definition -> word, 4-way; built beforehand under --data-root) for --steps steps, once with freezing=none
and once per --ratios with freezing=progressive and adaptive thresholds (a layer freezes when its gradient norm and
update size fell under `ratio` x its own early averages; absolute thresholds do not transfer between models). The
same data order, seed and learning-rate schedule in every variant. Per variant: training wall-clock (device
synchronised), median step time, lm-eval accuracy on the task's held-out items (--limit of them), the layers frozen
at the end and when each froze. Writes freezing.json, freezing.md and freezing.png (layers frozen over the run).

Toy mode: the tiny random Llama of experiment=lm_smoke on data=text_tiny_sft, a few steps, thresholds every layer
meets, so CI checks the plumbing (tests/test_bench_continual.py), not the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
from dataclasses import asdict
from pathlib import Path

from inprocess import ROOT, median_step_ms, run_and_close, set_up, train_timed  # noqa: F401

import torch

TASK = "wordnet_gloss"


def base_overrides(args) -> list[str]:
    common = [f"data_root={args.data_root}", "train.eval_every=null", "train.checkpoint_every=null",
              "train.eval_at_start=false", f"train.steps={args.steps}", f"train.log_every={args.log_every}",
              "evaluator=lm_eval", f"evaluator.limit={args.limit}", f"seed={args.seed}"]
    if args.toy:
        return ["experiment=lm_smoke", "data=text_tiny_sft", "evaluator.tasks=[docstring_name]",
                "evaluator.batch_size=16", "train.global_batch_size=16", *common]
    return ["experiment=lm_adapt", "+adaptation=full", "data=sft_wordnet_gloss", f"evaluator.tasks=[{TASK}]",
            *common]


def variants(args) -> list[tuple[str, list[str]]]:
    if args.toy:  # gradient norms here are ~0.1-1 and changes ~0.01: every layer is under at once
        return [("none", []), ("progressive", ["freezing=progressive", "freezing.threshold=100",
                                               "freezing.change_threshold=1", "freezing.window_size=2",
                                               "freezing.warmup_steps=4"])]
    adaptive = ["freezing=progressive", "freezing.adaptive_threshold=true", f"freezing.window_size={args.window}",
                f"freezing.check_every={args.check_every}", f"freezing.warmup_steps={args.warmup}"]
    return [("none", [])] + [(f"progressive ratio {r:g}", [*adaptive, f"freezing.adaptive_ratio={r}"])
                             for r in args.ratios]


def run_variant(name: str, overrides: list[str], run_dir: Path) -> dict:
    def work(recipe):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        seconds = train_timed(recipe)
        recipe.saved_step = recipe.step  # no final checkpoint: the study needs none (1.6 GB for SmolLM2 + AdamW)
        report = recipe.finish()  # final lm-eval on the task, callbacks' files (eval/freezing.json)
        [values] = report.results.values()
        freezing = next((cb.scheduler for cb in recipe.callbacks if cb.key == "freezing"), None)
        return {
            "variant": name, "overrides": overrides, "train_seconds": round(seconds, 2), "steps": recipe.step,
            "step_ms": median_step_ms(run_dir, recipe.cfg.train.global_batch_size),
            "accuracy": values["acc"], "eval_items": report.samples,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "layers": freezing.layer_names if freezing else None,
            "frozen_at_end": freezing.frozen_layers if freezing else [],
            "trainable_fraction_at_end": freezing.trainable_fraction() if freezing else 1.0,
            "events": [asdict(e) for e in freezing.events] if freezing else [],
            "run_dir": str(run_dir),
        }

    return run_and_close(set_up(overrides, run_dir), work)


def markdown(result: dict) -> str:
    base = result["variants"][0]
    lines = [f"Device: {result['device']}; {result['steps']} steps; lm-eval accuracy on {result['eval_task']} "
             f"({result['limit']} held-out items).", "",
             "| variant | train s | vs none | step ms | accuracy | layers frozen at end | first freeze at step |",
             "|---|---|---|---|---|---|---|"]
    for v in result["variants"]:
        first = min((e["step"] for e in v["events"] if e["action"] == "freeze"), default=None)
        total = len(v["layers"]) if v["layers"] else "-"
        step_ms = v["step_ms"] if v["step_ms"] is not None else float("nan")
        lines.append(f"| {v['variant']} | {v['train_seconds']:.1f} | {v['train_seconds'] / base['train_seconds']:.2f}x"
                     f" | {step_ms:.1f} | {100 * v['accuracy']:.1f}% | {len(v['frozen_at_end'])} / {total} | "
                     f"{first if first is not None else '-'} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    from athena.eval.plots import plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for v in result["variants"]:
        rows = [json.loads(line) for line in (Path(v["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        points = [(r["step"], r["freeze/layers_frozen"]) for r in rows if "freeze/layers_frozen" in r]
        if points:
            ax.step(*zip(*points), where="post", label=v["variant"])
    ax.set(xlabel="optimizer step", ylabel="layers frozen (input side first)", title="Progressive freezing")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", required=True, help="where the datasets are built (data_root)")
    parser.add_argument("--out", required=True, type=Path, help="folder for freezing.json / .md / .png")
    parser.add_argument("--toy", action="store_true", help="tiny random Llama on the CPU (plumbing only)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (300; toy 12)")
    parser.add_argument("--limit", type=int, default=None, help="held-out items scored (500; toy 16)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25], help="adaptive_ratio of each variant")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--check-every", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=30, help="no freezing before this step (the lr warm-up)")
    parser.add_argument("--log-every", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.steps = args.steps or (12 if args.toy else 300)
    args.limit = args.limit or (16 if args.toy else 500)
    args.log_every = args.log_every or (3 if args.toy else 25)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = Path(tempfile.mkdtemp(prefix="bench_freezing_", dir=args.out))
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
              "torch": torch.__version__, "toy": args.toy, "steps": args.steps, "limit": args.limit,
              "eval_task": "docstring_name" if args.toy else TASK, "variants": []}
    for i, (name, extra) in enumerate(variants(args)):
        result["variants"].append(run_variant(name, base_overrides(args) + extra, runs / f"{i}"))
        (args.out / "freezing.json").write_text(json.dumps(result, indent=2))  # what finished, if a later one fails
    (args.out / "freezing.md").write_text(markdown(result))
    plot(result, args.out / "freezing.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
