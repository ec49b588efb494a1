"""The official TRM's own training pipeline on our generated hard 9x9 Sudoku: its time to accuracy, for issue 4.

    python bench/official_pipeline.py --ref-dir .ref/official --evals 7 --out docs/results/time_to_accuracy/official
    python bench/time_to_accuracy.py --compare "Athena=docs/results/time_to_accuracy/athena/tta.json" \
        "official=docs/results/time_to_accuracy/official/tta.json" --out docs/results/time_to_accuracy/official

Runs SamsungSAILMontreal/TinyRecursiveModels' `pretrain.py` (its code under --ref-dir, used for the measurement
only and never committed) with the README's Sudoku command (TRM-MLP: arch=trm arch.mlp_t=True
arch.pos_encodings=none, L_layers 2, H_cycles 3, L_cycles 6, lr 1e-4, puzzle_emb_lr 1e-4, weight decay 1.0,
ema=True, batch 768) on the same data as bench/time_to_accuracy.py (Athena's `experiment=sudoku_extreme_1k`
build, made before the clock starts). Its loop evaluates the EMA weights on the whole test split every
`eval_interval` epochs; --eval-every steps is turned into that many epochs (one epoch = one example of each of
the 1000 puzzle groups). It runs --evals evaluations and stops (or at --max-minutes). The clock starts when its
process is launched, as for Athena.

Stand-ins, for what the GPU machine lacks (printed at start):
- `adam_atan2.AdamATan2`, the CUDA-only package, is Athena's pure-PyTorch AdamAtan2 (athena/training/
  optimizers.py): the same update rule, the same implementation Athena trains with.
- `wandb` records each `wandb.log` call with its wall-clock time in metrics.jsonl instead of sending it.
- `coolname` (run names) and `argdantic` (a CLI helper the training loop does not use) are empty stand-ins;
  `einops` is bench/references.py's permute-only stand-in when missing.

Writes tta.json (same layout as bench/time_to_accuracy.py's, so `--compare` plots both) and metrics.jsonl under
--out; the run's own output goes to stdout. GPU only: the official code puts everything on "cuda".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import runpy
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BATCH = 768
# The README's Sudoku-Extreme command, less the data path, epochs and eval interval set below.
README_SUDOKU = ["arch=trm", "evaluators=[]", "lr=1e-4", "puzzle_emb_lr=1e-4", "weight_decay=1.0",
                 "puzzle_emb_weight_decay=1.0", "arch.mlp_t=True", "arch.pos_encodings=none", "arch.L_layers=2",
                 "arch.H_cycles=3", "arch.L_cycles=6", "ema=True", f"global_batch_size={BATCH}"]


def epochs_per_eval(eval_every: int, total_groups: int) -> int:
    """The official loader draws one example per puzzle group per epoch and drops the last partial batch, so
    `epochs` epochs give floor(epochs * groups / batch) steps; eval_every steps need a whole number of epochs."""
    epochs = eval_every * BATCH / total_groups
    if epochs != int(epochs):
        raise SystemExit(f"error: --eval-every {eval_every} steps is {epochs:.2f} epochs of {total_groups} groups at "
                         f"batch {BATCH}; pick a multiple of {total_groups // math.gcd(total_groups, BATCH)} steps")
    return int(epochs)


def curve(rows: list[dict], start: float, n_test: int) -> list[dict]:
    """Athena's tta.json points ({minutes, step, exact, token, n}) from the official eval records."""
    return [dict(minutes=round((r["time"] - start) / 60, 2), step=r["step"], exact=r["all/exact_accuracy"],
                 token=r["all/accuracy"], n=n_test) for r in rows if "all/exact_accuracy" in r]


def train_speed(rows: list[dict], window: int = 50) -> float | None:
    """Median training steps/s over windows of `window` consecutive logged steps (robust to the eval pauses)."""
    train = [r for r in rows if "train/lm_loss" in r]
    rates = [(b["step"] - a["step"]) / (b["time"] - a["time"]) for a, b in zip(train, train[window:])
             if b["time"] > a["time"]]
    return statistics.median(rates) if rates else None


# ------------------------------------------------------------------------------------------------- child process

def _install_stand_ins(metrics_path: str) -> list[str]:
    from references import _shim_einops

    from athena.training.optimizers import AdamAtan2

    shims: list[str] = []
    _shim_einops(shims)
    mod = types.ModuleType("adam_atan2")
    mod.AdamATan2 = AdamAtan2
    sys.modules["adam_atan2"] = mod
    shims.append("adam_atan2 (Athena's AdamAtan2)")

    log = open(metrics_path, "a", buffering=1)

    def wandb_log(metrics: dict, step: int | None = None) -> None:
        flat = {}
        for key, value in metrics.items():
            for k, v in (value.items() if isinstance(value, dict) else [("", value)]):
                flat[f"{key}/{k}" if k else key] = float(v)
        log.write(json.dumps(dict(time=time.time(), step=step, **flat)) + "\n")

    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kw: None
    wandb.log = wandb_log
    wandb.finish = lambda: log.flush()
    wandb.Settings = lambda **kw: None
    wandb.run = None  # save_code_and_config then returns early
    sys.modules["wandb"] = wandb
    shims.append("wandb (metrics.jsonl recorder)")
    coolname = types.ModuleType("coolname")
    coolname.generate_slug = lambda n=2: "bench-run"
    sys.modules["coolname"] = coolname
    argdantic = types.ModuleType("argdantic")
    argdantic.ArgParser = object
    sys.modules["argdantic"] = argdantic
    shims.append("coolname, argdantic (unused by training)")
    return shims


def child(ref_dir: str, metrics_path: str, overrides: list[str]) -> None:
    from references import _mount_package

    shims = _install_stand_ins(metrics_path)
    ref_dir = os.path.realpath(ref_dir)
    sys.path.insert(0, ref_dir)
    for pkg in ("models", "dataset", "utils", "evaluators"):  # namespace packages; see references._mount_package
        _mount_package(pkg, os.path.join(ref_dir, pkg))
    print(f"[official] stand-ins: {'; '.join(shims)}", flush=True)
    pretrain = os.path.join(ref_dir, "pretrain.py")
    sys.argv = [pretrain, *overrides]
    runpy.run_path(pretrain, run_name="__main__")


# ------------------------------------------------------------------------------------------------------- parent

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref-dir", default=str(ROOT / ".ref/official"))
    parser.add_argument("--evals", type=int, default=7, help="evaluations to run (training stops after the last)")
    parser.add_argument("--eval-every", type=int, default=1000, help="training steps between evaluations")
    parser.add_argument("--max-minutes", type=float, default=27.0, help="stop the run after this long regardless")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "outputs/official_pipeline")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/time_to_accuracy/official")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.run_dir = args.run_dir.resolve()  # the child runs inside it
    if args.child is not None:
        child(args.ref_dir, str(args.run_dir / "metrics.jsonl"), args.child)
        return
    if not os.path.isfile(os.path.join(args.ref_dir, "pretrain.py")):
        sys.exit(f"error: no pretrain.py under --ref-dir {args.ref_dir}; clone the official TRM repository there")

    from athena.config import compose_config, validate_config
    from athena.data.build import ensure_dataset

    cfg = validate_config(compose_config(["experiment=sudoku_extreme_1k"]))
    build_start = time.time()
    data = cfg.dataset_dir().resolve()
    ensure_dataset(data, dict(cfg.data.build))
    build_s = time.time() - build_start
    train_meta = json.loads((data / "train/dataset.json").read_text())
    n_test = json.loads((data / "test/dataset.json").read_text())["total_puzzles"]
    epochs = epochs_per_eval(args.eval_every, train_meta["total_groups"])
    overrides = [*README_SUDOKU, f"data_paths=[{data}]", f"epochs={epochs * args.evals}", f"eval_interval={epochs}",
                 f"+checkpoint_path={args.run_dir / 'checkpoints'}", "+run_name=bench"]

    args.run_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    metrics = args.run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, __file__, "--ref-dir", args.ref_dir, "--run-dir", str(args.run_dir), "--child", *overrides]
    start = time.time()
    try:
        returncode = subprocess.run(cmd, cwd=args.run_dir, env=env, timeout=args.max_minutes * 60).returncode
    except subprocess.TimeoutExpired:
        returncode = "timeout"
    total_s = time.time() - start
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    points = curve(rows, start, n_test)
    speed = train_speed(rows)
    summary = dict(pipeline="official TRM pretrain.py", overrides=overrides, returncode=returncode,
                   data_build_s=round(build_s, 1), wall_clock_s=round(total_s, 1),
                   train_steps_per_s=speed and round(speed, 3),
                   train_samples_per_s=speed and round(speed * BATCH), curve=points)
    (args.out / "tta.json").write_text(json.dumps(summary, indent=1) + "\n")
    if metrics.is_file():
        (args.out / "metrics.jsonl").write_text(metrics.read_text())
    print(f"[official] {json.dumps(points[-1] if points else None)}; {summary['train_samples_per_s']} samples/s; "
          f"wall clock {total_s / 60:.1f} min; return code {returncode}")
    sys.exit(0 if returncode == 0 else 1)


if __name__ == "__main__":
    main()
