"""Continual learning on TRM: 6x6 Sudoku, then 6x6 Sudoku-X, with and without rehearsal (issue 17's "TRM Sudoku ->
Sudoku-X"); sized for a CPU.

    OMP_NUM_THREADS=1 python bench/continual_trm.py --data-root DATA --out docs/results/continual --jobs 2
    python bench/continual_trm.py --toy --data-root /tmp/data --out /tmp/continual_trm     # 4x4, seconds (plumbing)

Runs (each a `pretrain.py` subprocess with the default recipe: trm_small, AdamAtan2, EMA; --steps each):
  stage 1          data=sudoku6 from scratch
  scratch          data=sudoku6_x from scratch (the reference: what stage 2 would reach without stage 1)
  stage 2, plain   data=sudoku6_x, init_from=stage 1 (its EMA weights), a fresh optimizer
  stage 2, buffer  the same plus rehearsal=buffer: --budget samples of sudoku6's train split, --replay-ratio of every
                   batch's rows replaced by them (athena/training/rehearsal.py)
Every run's EMA weights are then scored with `evaluate.py` on BOTH test splits (500 puzzles each, all supervision
steps): exact accuracy (every cell right). The two tasks share the grid and the vocabulary but not the rules: a
Sudoku-X solution is a Sudoku solution, not the other way round, and a Sudoku-X puzzle has fewer clues than a
Sudoku of the same grid would need (its diagonals constrain too), so a model that forgets Sudoku's rules or never
learned the diagonals fails the other task.

Reported per variant: the accuracy matrix acc[stage][task], average accuracy after stage 2, forgetting of Sudoku
(its accuracy after stage 1 minus after stage 2) and backward transfer, as bench/continual.py; the scratch run's
accuracies beside them. --jobs N runs up to N independent runs at once (stage 1 with scratch, then the two stage-2
variants); give each one thread (OMP_NUM_THREADS=1) so they do not fight over cores. Writes continual_trm.json,
continual_trm.md and continual_trm.png; the json after every run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from continual import plot, summary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from athena.config import compose_config, validate_config  # noqa: E402
from athena.data.build import ensure_dataset  # noqa: E402

FULL_TASKS = [("sudoku6", ["data=sudoku6"]), ("sudoku6_x", ["data=sudoku6_x"])]
# Toy: 4x4 Sudoku and 4x4 Sudoku-X (same builder, diagonal on), a tiny TRM, a few steps.
TOY_TASKS = [("sudoku4", ["data=sudoku4"]),
             ("sudoku4_x", ["data=sudoku4", "data.name=sudoku4_x", "+data.build.diagonal=true"])]
TOY_RUN = ["experiment=smoke", "train.eval_every=null", "train.checkpoint_every=null", "train.log_every=2"]


def build_tasks(args) -> list[dict]:
    """Per task: its data overrides and its built dataset folder (built here once, before any run)."""
    out = []
    for name, data in TOY_TASKS if args.toy else FULL_TASKS:
        cfg = validate_config(compose_config([*data, f"data_root={args.data_root}"]))
        folder = ensure_dataset(cfg.dataset_dir(), dict(cfg.data.build))
        out.append({"name": name, "data": data, "dir": str(folder)})
    return out


def run(args, name: str, overrides: list[str]) -> dict:
    """One pretrain.py run in <runs>/<name>; its wall time and final eval (own test split) read back."""
    run_dir = args.runs / name
    common = [f"data_root={args.data_root}", f"seed={args.seed}", f"train.steps={args.steps}",
              f"hydra.run.dir={run_dir}", "device=cpu" if args.toy else f"device={args.device}"]
    command = [sys.executable, str(ROOT / "pretrain.py"), *(TOY_RUN if args.toy else []), *overrides, *common]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: run {name} failed ({' '.join(command[2:])}): {proc.stderr.strip()[-1500:]}")
    return {"name": name, "overrides": overrides, "run_dir": str(run_dir),
            "wall_s": round(time.perf_counter() - start, 1)}


def score(args, run_info: dict, task: dict) -> float:
    """Exact accuracy of a run's EMA weights on a task's whole test split (evaluate.py in a subprocess)."""
    run_dir = Path(run_info["run_dir"])
    name = f"on_{task['name']}"
    command = [sys.executable, str(ROOT / "evaluate.py"), f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}",
               *task["data"], f"data_root={args.data_root}", f"eval.output_dir={run_dir / 'eval'}", f"eval.name={name}"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: scoring {run_info['name']} on {task['name']} failed: {proc.stderr.strip()[-1500:]}")
    return json.loads((run_dir / "eval" / f"{name}.json").read_text())["exact_accuracy"]


def markdown(result: dict) -> str:
    names = [t["name"] for t in result["tasks"]]
    lines = [f"Device: {result['device']} ({result['threads']}); {result['model']}, {result['steps']} steps per run, "
             f"seed {result['seed']}; exact accuracy (EMA weights) on each task's whole test split. Rehearsal: budget "
             f"{result['budget']}, replay ratio {result['replay_ratio']}.", ""]
    header = "| after | " + " | ".join(names) + " |"
    for variant in result["variants"]:
        lines += [f"**{variant['name']}**", "", header, "|---|" + "---|" * len(names)]
        for stage, row in enumerate(variant["matrix"]):
            lines.append(f"| stage {stage + 1}: {names[stage]} | " + " | ".join(f"{100 * a:.1f}%" for a in row) + " |")
        s = variant["summary"]
        lines += ["", f"average accuracy {100 * s['average_accuracy']:.1f}%, forgetting of {names[0]} "
                      f"{100 * s['average_forgetting']:.1f} points, backward transfer "
                      f"{100 * s['backward_transfer']:+.1f} points", ""]
    scratch = result["scratch"]
    lines.append(f"**{names[1]} from scratch** (same steps, no stage 1): " + ", ".join(
        f"{n} {100 * a:.1f}%" for n, a in zip(names, scratch["accuracy"])))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", required=True, help="where the datasets are built (data_root)")
    parser.add_argument("--out", required=True, type=Path, help="folder for continual_trm.json / .md / .png")
    parser.add_argument("--toy", action="store_true", help="4x4 Sudoku -> 4x4 Sudoku-X, a tiny TRM, a few steps")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (1000, the recipe's; toy 6)")
    parser.add_argument("--budget", type=int, default=None, help="rehearsal buffer size (1000; toy 32)")
    parser.add_argument("--replay-ratio", type=float, default=0.25)
    parser.add_argument("--jobs", type=int, default=1, help="independent runs at once")
    parser.add_argument("--device", default="cpu", help="pretrain.py's device= (cpu, cuda, auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=None, help="run folders (default: <out>/continual_trm_runs)")
    args = parser.parse_args()
    args.steps = args.steps or (6 if args.toy else 1000)
    args.budget = args.budget or (32 if args.toy else 1000)
    args.out.mkdir(parents=True, exist_ok=True)
    args.runs = args.runs or args.out / "continual_trm_runs"
    stem = "continual_trm_toy" if args.toy else "continual_trm"
    tasks = build_tasks(args)
    first, second = tasks
    result = {"device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
              "threads": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, --jobs {args.jobs}",
              "torch": torch.__version__, "date": dt.date.today().isoformat(), "toy": args.toy,
              "model": "the smoke TRM (hidden 32)" if args.toy else "trm_small (hidden 64, TRM-MLP)",
              "command": "python " + " ".join(sys.argv), "steps": args.steps, "seed": args.seed,
              "budget": args.budget, "replay_ratio": args.replay_ratio, "tasks": tasks, "runs": []}

    def save() -> None:
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))

    def scored(name: str, overrides: list[str]) -> dict:
        info = run(args, name, overrides)
        info["accuracy"] = [score(args, info, task) for task in tasks]
        print(f"[continual_trm] {name}: " + ", ".join(f"{t['name']} {100 * a:.1f}%" for t, a in
                                                      zip(tasks, info["accuracy"])) + f" ({info['wall_s']} s)",
              flush=True)
        result["runs"].append(info)
        save()
        return info

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads: each only waits on its subprocess
        stage1 = pool.submit(scored, "stage1", first["data"])
        scratch = pool.submit(scored, "scratch", second["data"])
        stage1 = stage1.result()
        start = [*second["data"], f"init_from={Path(stage1['run_dir']) / 'checkpoints' / 'last.pt'}"]
        rehearsal = ["rehearsal=buffer", f"rehearsal.from_data=[{first['dir']}]", f"rehearsal.budget={args.budget}",
                     f"rehearsal.replay_ratio={args.replay_ratio}", f"rehearsal.seed={args.seed}"]
        plain = pool.submit(scored, "stage2_plain", start)
        buffer = pool.submit(scored, "stage2_rehearsal", [*start, *rehearsal])
        result["scratch"] = scratch.result()
        result["variants"] = [{"name": name, "matrix": [stage1["accuracy"], future.result()["accuracy"]]}
                              for name, future in (("no rehearsal", plain), ("rehearsal", buffer))]
    for variant in result["variants"]:
        variant["summary"] = summary(variant["matrix"])
    save()
    (args.out / f"{stem}.md").write_text(markdown(result))
    plot(result, args.out / f"{stem}.png", ylabel="exact accuracy (%)", title="TRM: Sudoku -> Sudoku-X")
    print(markdown(result))


if __name__ == "__main__":
    main()
