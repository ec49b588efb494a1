"""AMRPA across TRM's recursion (issue 19, TRM half): TRM with the attention mixer on Sudoku, with and without the
memory (arch.amrpa_window), at equal recursion compute: the same H/L cycles, supervision steps, optimizer steps, batch,
learning rate and seed; only the memory differs. Several seeds. Arms: `attention` (no memory), `attention + amrpa`
(the memory with its defaults: gate strength starting at 0, the model starts as the one without), and in full mode
`... open` (gate strength starting at 1: the memory mixes in from the first step).

Each (seed, arm) runs `pretrain.py` in a child process (the real loop, PretrainRecipe, in-process there), so its peak
resident memory is its own. Per run: final test exact and token accuracy (the whole test split, EMA weights), median
optimizer-step time, peak memory (CUDA allocator peak on a GPU, the process's peak RSS on a CPU), parameters, and the
memory's metrics at the last log step (gate_mean, gate_impact, alpha_diversity, memory_similarity, gate_strength).

    python bench/amrpa_trm.py --data-root DIR --out DIR                   # full: sudoku6, 450 steps, 2 seeds
    python bench/amrpa_trm.py --toy --data-root DIR --out DIR             # plumbing: sudoku4, a few steps

Writes <out>/amrpa_trm.json and amrpa_trm.md (+ amrpa_trm.png: test token accuracy per arm and seed). Needs
hydra/omegaconf (compose), torch, athena; matplotlib for the plot (skipped without it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this tree's athena, not an installed one
sys.path.insert(0, str(Path(__file__).resolve().parent))

AMRPA_METRICS = ("gate_mean", "gate_impact", "alpha_diversity", "memory_similarity", "gate_strength")


def base_overrides(args) -> list[str]:
    common = [f"data_root={args.data_root}", "arch=trm_small", "arch.mixer=attention", f"train.steps={args.steps}",
              f"train.lr={args.lr}", f"train.global_batch_size={args.batch}", "train.eval_every=null",
              "train.checkpoint_every=null", "train.eval_at_start=false", f"train.log_every={args.log_every}",
              f"train.lr_warmup_steps={min(100, args.steps // 4)}"]
    return [f"data={'sudoku4' if args.toy else args.data}", *common]


def arms(args) -> list[tuple[str, list[str]]]:
    memory = [f"arch.amrpa_window={args.window}", f"arch.amrpa_decay={args.decay}",
              f"arch.amrpa_alpha_mlp_hidden={args.alpha_hidden}"]
    out = [("attention", []), (f"attention + amrpa W={args.window}", memory)]
    if args.open_arm:  # the gate's strength starts at 1 (open, as the issue describes the gate) instead of 0
        out.append((f"attention + amrpa W={args.window} open", [*memory, "arch.amrpa_gate_init_strength=1"]))
    return out


def run_one(overrides: list[str], run_dir: Path, out: Path) -> None:
    """Child process: train and evaluate one arm, write its record to `out`."""
    import torch
    from inprocess import median_step_ms, run_and_close, set_up, train_timed

    def work(recipe):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        seconds = train_timed(recipe)
        recipe.saved_step = recipe.step  # no final checkpoint: the study needs none
        report = recipe.finish()
        metrics = report.metrics()
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        logged = [r for r in rows if "train/lm_loss" in r]
        last = logged[-1] if logged else {}
        model = recipe.model
        return {
            "overrides": overrides, "steps": recipe.step, "train_seconds": round(seconds, 2),
            "step_ms": median_step_ms(run_dir, recipe.cfg.train.global_batch_size),
            "exact_accuracy": metrics.get("eval/exact_accuracy"), "token_accuracy": metrics.get("eval/token_accuracy"),
            "test_count": metrics.get("eval/count"),
            "train_token_accuracy_last": last.get("train/accuracy"), "train_lm_loss_last": last.get("train/lm_loss"),
            "curve": [{"step": r["step"], "lm_loss": r["train/lm_loss"], "accuracy": r.get("train/accuracy")}
                      for r in logged],
            "amrpa": {k: last[f"train/amrpa_{k}"] for k in AMRPA_METRICS if f"train/amrpa_{k}" in last},
            "parameters": sum(p.numel() for p in model.parameters()),
            "peak_mem_mb": (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_mem_kind": "cuda allocator peak" if torch.cuda.is_available() else "process peak RSS",
        }

    out.write_text(json.dumps(run_and_close(set_up(overrides, run_dir), work), indent=2))


def interleaved_step_ms(args, seq_len: int) -> dict[str, float]:
    """Median training-step time of the arms' models built side by side and stepped in turn (4 rounds of 6 steps, the
    first 2 left out) on random Sudoku-shaped batches: on a shared machine the runs' own step times see different
    loads, this sees the same. The default-width selection MLP (384) is timed too."""
    import torch

    from athena.models.trm import TinyRecursiveModel

    memory = {"amrpa_window": args.window, "amrpa_decay": args.decay}
    variants = {"attention": {}, f"amrpa W={args.window} (selection MLP {args.alpha_hidden})":
                {**memory, "amrpa_alpha_mlp_hidden": args.alpha_hidden},
                f"amrpa W={args.window} (selection MLP 384, default)": memory}
    rounds, steps = (2, 3) if args.toy else (4, 6)
    state, times = {}, {name: [] for name in variants}
    for name, kw in variants.items():
        torch.manual_seed(0)
        model = TinyRecursiveModel(8, seq_len, 1, hidden_size=64, num_heads=2, num_layers=2, H_cycles=2, L_cycles=3,
                                   halt_max_steps=8, puzzle_emb_len=0, mixer="attention", **kw).train()
        batch = {"inputs": torch.randint(1, 8, (args.batch, seq_len)), "labels": torch.randint(1, 8, (args.batch,
                 seq_len)), "puzzle_identifiers": torch.zeros(args.batch, dtype=torch.long)}
        state[name] = [model, torch.optim.Adam(model.parameters()), batch, model.initial_carry(batch)]
    for round_ in range(rounds):
        for name, item in state.items():
            model, optimizer, batch = item[:3]
            for i in range(steps):
                start = time.perf_counter()
                item[3], out = model(item[3], batch)
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                if round_ > 0 or i > 1:
                    times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def summary(values: list[float | None]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def markdown(result: dict) -> str:
    lines = [f"AMRPA across TRM's recursion: {result['data']}, {result['steps']} steps, batch {result['batch']}, "
             f"lr {result['lr']}, seeds {result['seeds']}; device {result['device']} ({result['threads']} thread(s)), "
             f"{result['date']}", "",
             "| arm | test exact | test token acc. | step ms | peak mem MB | params | gate_mean | gate_impact | "
             "alpha_div. |", "|---|---|---|---|---|---|---|---|---|"]

    def fmt(s, scale=1.0, digits=1):
        return "n/a" if s["mean"] is None else f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"

    for name, arm in result["summary"].items():
        lines.append(f"| {name} | {fmt(arm['exact_accuracy'], 100)}% | {fmt(arm['token_accuracy'], 100)}% | "
                     f"{fmt(arm['step_ms'], 1, 0)} | {fmt(arm['peak_mem_mb'], 1, 0)} | {arm['parameters']} | "
                     f"{fmt(arm['gate_mean'], 1, 3)} | {fmt(arm['gate_impact'], 1, 3)} | "
                     f"{fmt(arm['alpha_diversity'], 1, 3)} |")
    if result.get("interleaved_step_ms"):
        base = result["interleaved_step_ms"]["attention"]
        lines += ["", f"Step time, the arms' models stepped in turn in one process (batch {result['batch']}, the same "
                  "load): " + "; ".join(f"{name} {ms:.0f} ms ({ms / base:.2f}x)" for name, ms in
                              result["interleaved_step_ms"].items())]
    lines += ["", "Per seed (test token accuracy): " + "; ".join(
        f"{r['arm']} seed {r['seed']}: {100 * r['token_accuracy']:.1f}%" for r in result["runs"]
        if r.get("token_accuracy") is not None), "", f"Command: `{result['command']}`"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    colours = {name: f"C{i}" for i, name in enumerate(result["summary"])}
    for run in result["runs"]:
        curve = [c for c in run.get("curve", []) if c["accuracy"] is not None]
        if curve:
            ax.plot([c["step"] for c in curve], [c["accuracy"] for c in curve], color=colours[run["arm"]], alpha=0.8,
                    linestyle="-" if run["seed"] == result["seeds"][0] else "--",
                    label=f"{run['arm']} (seed {run['seed']})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train token accuracy (halted slots)")
    ax.set_title(f"TRM attention on {result['data']} ({result['device']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", required=True, help="where the datasets are built (data_root)")
    parser.add_argument("--out", required=True, type=Path, help="folder for amrpa_trm.json / .md / .png")
    parser.add_argument("--toy", action="store_true", help="sudoku4, a few steps (plumbing only)")
    parser.add_argument("--data", default="sudoku6", help="data config of the full mode (sudoku6: 500 test puzzles)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (450; toy 6)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (0 1; toy 0)")
    parser.add_argument("--batch", type=int, default=None, help="global batch (128; toy 16)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--window", type=int, default=4, help="arch.amrpa_window of the memory arm")
    parser.add_argument("--decay", type=float, default=0.9, help="arch.amrpa_decay of the memory arm")
    parser.add_argument("--alpha-hidden", type=int, default=64, help="arch.amrpa_alpha_mlp_hidden (the model's width)")
    parser.add_argument("--open-arm", action=argparse.BooleanOptionalAction, default=None,
                        help="also run the memory with its gate strength starting at 1 (open; default: full mode)")
    parser.add_argument("--log-every", type=int, default=None)
    parser.add_argument("--name", default="amrpa_trm", help="file stem of the outputs")
    parser.add_argument("--timing-only", action="store_true",
                        help="only the interleaved step timing, added to an existing <out>/<name>.json")
    parser.add_argument("--one", nargs=3, metavar=("OVERRIDES_JSON", "RUN_DIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.one:
        run_one(json.loads(args.one[0]), Path(args.one[1]), Path(args.one[2]))
        return
    args.steps = args.steps or (6 if args.toy else 450)
    args.seeds = args.seeds or [0] if args.toy else args.seeds or [0, 1]
    args.batch = args.batch or (16 if args.toy else 128)
    args.open_arm = not args.toy if args.open_arm is None else args.open_arm
    args.log_every = args.log_every or (2 if args.toy else 25)
    args.out.mkdir(parents=True, exist_ok=True)
    runs_dir = args.out / f"{args.name}_runs"
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({cpu_name()})"
    result = {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__, "toy": args.toy,
              "data": "sudoku4" if args.toy else args.data, "steps": args.steps, "batch": args.batch, "lr": args.lr,
              "seeds": args.seeds, "window": args.window, "decay": args.decay, "alpha_mlp_hidden": args.alpha_hidden,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python bench/amrpa_trm.py " + " ".join(sys.argv[1:]), "runs": [], "summary": {}}
    path = args.out / f"{args.name}.json"
    seq_len = 16 if args.toy else {"sudoku4": 16, "sudoku6": 36, "sudoku": 81}.get(args.data, 36)
    if args.timing_only:
        result = json.loads(path.read_text())
    for seed in args.seeds if not args.timing_only else []:  # seed-major: a cut-short study keeps whole seeds
        for i, (name, extra) in enumerate(arms(args)):
            run_dir = runs_dir / f"seed{seed}_{i}"
            overrides = base_overrides(args) + extra + [f"seed={seed}"]
            record_path = run_dir.with_suffix(".json")
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run([sys.executable, __file__, "--data-root", str(args.data_root), "--out", str(args.out),
                                   "--one", json.dumps(overrides), str(run_dir), str(record_path)], cwd=ROOT,
                                  env={**os.environ}, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"amrpa_trm: the run {name} seed {seed} failed:\n{proc.stderr[-3000:]}")
            record = {"arm": name, "seed": seed, **json.loads(record_path.read_text())}
            result["runs"].append(record)
            logging.info("%s seed %d: token %.4f exact %.4f, %.0f ms/step", name, seed, record["token_accuracy"],
                         record["exact_accuracy"], record["step_ms"] or float("nan"))
            result["summary"] = summarise(result["runs"])
            path.write_text(json.dumps(result, indent=2))  # what finished, if a later one fails
    result["interleaved_step_ms"] = interleaved_step_ms(args, seq_len)
    result["interleaved_command"] = "python bench/amrpa_trm.py " + " ".join(sys.argv[1:])
    path.write_text(json.dumps(result, indent=2))
    (args.out / f"{args.name}.md").write_text(markdown(result))
    plot(result, args.out / f"{args.name}.png")
    print(markdown(result))


def summarise(runs: list[dict]) -> dict:
    out: dict = {}
    for name in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == name]
        out[name] = {key: summary([r[key] for r in mine]) for key in
                     ("exact_accuracy", "token_accuracy", "step_ms", "peak_mem_mb", "train_seconds")}
        out[name].update({key: summary([r["amrpa"].get(key) for r in mine]) for key in AMRPA_METRICS})
        out[name]["parameters"] = mine[0]["parameters"]
        out[name]["seeds"] = [r["seed"] for r in mine]
    return out


if __name__ == "__main__":
    main()
