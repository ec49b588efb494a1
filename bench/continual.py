"""Continual learning over three text tasks with and without rehearsal: accuracy matrix, average accuracy, forgetting.

    python bench/continual.py --data-root DATA --out docs/results/continual        # SmolLM2 + LoRA, one H200, < 3 min
    python bench/continual.py --toy --data-root /tmp/data --out /tmp/continual     # tiny random Llama on a CPU

Full mode: SmolLM2-135M-Instruct with LoRA (experiment=lm_adapt +adaptation=lora) fine-tuned on three offline tasks
in turn, --steps steps each: sft_fortune_topics (fortune -> topic, 16-way), sft_wordnet_gloss (definition -> word,
4-way), sft_wordnet_category (word + definition -> lexicographer file); their datasets are built beforehand under
--data-root. Each stage starts from the previous stage's weights, adapter included (loaded into the set-up run: a
run's init_from loads base weights only), with a fresh optimizer. After each stage lm-eval scores all three tasks on
their held-out items (--limit each), and the base model once before any training. Stage 1 is the same for both
variants, so it runs once; stages 2 and 3 run with rehearsal=none and with rehearsal=buffer (the earlier tasks'
train splits fill the buffer, --budget samples, task_balanced, --replay-ratio of each batch).

Reported per variant: the accuracy matrix acc[stage][task]; average accuracy after the last stage; forgetting of each
earlier task (its best accuracy at an earlier stage minus its accuracy after the last) and their mean; backward
transfer (acc after the last stage minus acc right after learning it, averaged over the earlier tasks). Writes
continual.json, continual.md and continual.png.

Toy mode: the tiny random Llama of experiment=lm_smoke with LoRA (base not frozen: it is random) on data=text_tiny_sft
as each of the three "tasks" (one small build), a few steps; CI checks the plumbing (tests/test_bench_continual.py),
not the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
from pathlib import Path

from inprocess import lm_eval_accuracy, run_and_close, set_up, train_timed

import torch

from athena.config import compose_config, validate_config
from athena.data.build import ensure_dataset

FULL_TASKS = [("sft_fortune_topics", "fortune_topics"), ("sft_wordnet_gloss", "wordnet_gloss"),
              ("sft_wordnet_category", "wordnet_category")]


def tasks(args) -> list[dict]:
    """Per task: the data overrides of its stage, its built dataset folder and its lm-eval task file."""
    if args.toy:
        specs = [(["data=text_tiny_sft"], "docstring_name")] * 3  # one small build; the same rows three times
    else:
        specs = [([f"data={option}"], name) for option, name in FULL_TASKS]
    out = []
    for data, name in specs:
        cfg = validate_config(compose_config([*data, f"data_root={args.data_root}"]))
        folder = ensure_dataset(cfg.dataset_dir(), dict(cfg.data.build))  # built beforehand: found in the cache
        out.append({"name": name, "data": data, "dir": str(folder), "yaml": folder / "tasks" / f"{name}.yaml"})
    return out


def stage_overrides(args, task: dict, earlier: list[dict], rehearsal: bool) -> list[str]:
    common = [*task["data"], f"data_root={args.data_root}", f"train.steps={args.steps}", f"seed={args.seed}",
              f"train.log_every={args.log_every}", "train.eval_every=null", "train.checkpoint_every=null",
              "train.eval_at_start=false"]
    if args.toy:
        base = ["experiment=lm_smoke", "adapter=lora", "adapter.freeze_base=false", "train.global_batch_size=16",
                *common]
    else:
        base = ["experiment=lm_adapt", "+adaptation=lora", *common]
    if rehearsal and earlier:
        base += ["rehearsal=buffer", f"rehearsal.from_data=[{','.join(t['dir'] for t in earlier)}]",
                 f"rehearsal.budget={args.budget}", "rehearsal.policy=task_balanced",
                 f"rehearsal.replay_ratio={args.replay_ratio}", f"rehearsal.seed={args.seed}"]
    return base


def scores(recipe, all_tasks: list[dict], args) -> list[float]:
    return [lm_eval_accuracy(recipe, t["yaml"], args.limit, args.eval_batch) for t in all_tasks]


def run_stage(args, all_tasks, index: int, rehearsal: bool, start_state, run_dir: Path, zero_shot: bool = False):
    """Train stage `index` from `start_state` (None: the base); returns (result, state after, zero-shot scores)."""
    overrides = stage_overrides(args, all_tasks[index], all_tasks[:index], rehearsal)

    def work(recipe):
        if start_state is not None:
            recipe.model.load_state_dict(start_state)
        before = scores(recipe, all_tasks, args) if zero_shot else None
        seconds = train_timed(recipe)
        after = scores(recipe, all_tasks, args)
        state = {k: v.detach().clone() for k, v in recipe.model.state_dict().items()}
        recipe.loggers.finish()
        return {"stage": index, "task": all_tasks[index]["name"], "rehearsal": rehearsal and index > 0,
                "train_seconds": round(seconds, 2), "accuracy": after, "run_dir": str(run_dir)}, state, before

    return run_and_close(set_up(overrides, run_dir), work)


def summary(matrix: list[list[float]]) -> dict:
    """Average accuracy after the last stage, forgetting and backward transfer over the earlier tasks."""
    last = len(matrix) - 1
    forgetting = [max(matrix[k][j] for k in range(j, last)) - matrix[last][j] for j in range(last)]
    transfer = [matrix[last][j] - matrix[j][j] for j in range(last)]
    return {"average_accuracy": sum(matrix[last]) / len(matrix[last]), "forgetting": forgetting,
            "average_forgetting": sum(forgetting) / len(forgetting), "backward_transfer": sum(transfer) / len(transfer)}


def markdown(result: dict) -> str:
    names = [t["name"] for t in result["tasks"]]
    lines = [f"Device: {result['device']}; {result['steps']} steps per stage; lm-eval accuracy on {result['limit']} "
             f"held-out items per task. Base model before any training: "
             + ", ".join(f"{n} {100 * a:.1f}%" for n, a in zip(names, result["zero_shot"])) + ".", ""]
    for variant in result["variants"]:
        lines += [f"**{variant['name']}**", "", "| after stage | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for stage, row in enumerate(variant["matrix"]):
            lines.append(f"| {stage + 1}: {names[stage]} | " + " | ".join(f"{100 * a:.1f}%" for a in row) + " |")
        s = variant["summary"]
        lines += ["", f"average accuracy {100 * s['average_accuracy']:.1f}%, average forgetting "
                      f"{100 * s['average_forgetting']:.1f} points, backward transfer "
                      f"{100 * s['backward_transfer']:+.1f} points", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path, ylabel: str = "lm-eval accuracy (%)",
         title: str = "Continual learning: accuracy of each task") -> None:
    from athena.eval.plots import plt

    names = [t["name"] for t in result["tasks"]]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for variant, style in zip(result["variants"], ("-", "--")):
        for j, name in enumerate(names):
            ax.plot(range(1, len(variant["matrix"]) + 1), [100 * row[j] for row in variant["matrix"]], style,
                    marker="o", color=f"C{j}", label=f"{name} ({variant['name']})")
    ax.set(xlabel="after stage", ylabel=ylabel, title=title)
    ax.set_xticks(range(1, len(names) + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", required=True, help="where the datasets are built (data_root)")
    parser.add_argument("--out", required=True, type=Path, help="folder for continual.json / .md / .png")
    parser.add_argument("--toy", action="store_true", help="tiny random Llama on the CPU (plumbing only)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per stage (150; toy 4)")
    parser.add_argument("--limit", type=int, default=None, help="held-out items scored per task (200; toy 8)")
    parser.add_argument("--budget", type=int, default=None, help="rehearsal buffer size (1000; toy 32)")
    parser.add_argument("--replay-ratio", type=float, default=0.25)
    parser.add_argument("--eval-batch", type=int, default=None, help="lm-eval batch size (32; toy 16)")
    parser.add_argument("--log-every", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.steps = args.steps or (4 if args.toy else 150)
    args.limit = args.limit or (8 if args.toy else 200)
    args.budget = args.budget or (32 if args.toy else 1000)
    args.eval_batch = args.eval_batch or (16 if args.toy else 32)
    args.log_every = args.log_every or (2 if args.toy else 25)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = Path(tempfile.mkdtemp(prefix="bench_continual_", dir=args.out))
    all_tasks = tasks(args)
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
              "torch": torch.__version__, "toy": args.toy, "steps": args.steps, "limit": args.limit,
              "budget": args.budget, "replay_ratio": args.replay_ratio,
              "tasks": [{k: str(v) if isinstance(v, Path) else v for k, v in t.items()} for t in all_tasks],
              "stages": [], "variants": []}
    first, after_first, zero_shot = run_stage(args, all_tasks, 0, False, None, runs / "stage1", zero_shot=True)
    result["zero_shot"] = zero_shot
    result["stages"].append(first)
    for name, rehearsal in (("no rehearsal", False), ("rehearsal", True)):
        state, matrix = after_first, [first["accuracy"]]
        for index in range(1, len(all_tasks)):
            stage, state, _ = run_stage(args, all_tasks, index, rehearsal, state,
                                        runs / f"{'rehearsal' if rehearsal else 'plain'}_stage{index + 1}")
            result["stages"].append(stage)
            matrix.append(stage["accuracy"])
            (args.out / "continual.json").write_text(json.dumps(result, indent=2))  # what finished so far
        result["variants"].append({"name": name, "matrix": matrix, "summary": summary(matrix)})
    (args.out / "continual.json").write_text(json.dumps(result, indent=2))
    (args.out / "continual.md").write_text(markdown(result))
    plot(result, args.out / "continual.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
