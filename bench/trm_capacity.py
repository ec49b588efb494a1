"""TRM capacity study: Sudoku exact accuracy vs FFN capacity (arch.ffn_capacity) vs measured time, on this machine.

    OMP_NUM_THREADS=1 nice -n 5 python bench/trm_capacity.py --out docs/results/adaptive      # trm_small, sudoku6
    python bench/trm_capacity.py --toy --out /tmp/trm_capacity_toy                            # seconds, plumbing
    python bench/trm_capacity.py --device cuda --out $OUT --seeds 0,1                          # the GPU's numbers
    ... --seeds 1 --add-to docs/results/adaptive/trm_capacity_cpu_<date>.json    # another seed, same timing

Per capacity (and seed), in this order:
1. training: `pretrain.py arch=trm_small data=sudoku6 arch.ffn_capacity=c seed=s` in a subprocess with the default
   recipe (1000 steps, as `make run`); its final eval on the full test split (all halt_max_steps steps):
   exact accuracy, exact accuracy at the Q-head halt and mean halt steps (ACT, the vertical exit), plus the
   realised capacity the run logged and the run's wall time;
2. timing (in this process, torch threads as given, BEFORE the training runs; capacities interleaved round-robin
   so a slow patch of a shared machine hits all of them alike; warm-up excluded, medians):
   - training step: forward + backward + AdamAtan2 step of one supervision step at the recipe's batch,
   - eval forward: all halt_max_steps supervision steps of one eval batch (no grad, eval mode), as the
     evaluator runs them; x mean_halt_steps / halt_max_steps is the time if every puzzle stopped at its halt,
   - "no FFN": capacity so small that no position is routed (k = 0: the FFN, its norm and the router skipped
     outright): the time ceiling of FFN skipping, c -> 0;
3. the FLOP share removed, counted from the shapes (`routed_flops`: the FFN's matmuls against the whole block's +
   the heads, router added), i.e. the FLOP ceiling of the speedup, for a training step and for eval.
Timing runs first (minutes), then the training runs in the order of --capacities; <out>/trm_capacity_<device>_<date>
.json/.md/.png are rewritten after every run ("partial": true until the last): the .png plots exact accuracy vs
measured speedup over dense, with the FLOP ceiling.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from athena.device import autocast_for  # noqa: E402
from athena.eval.flops import layer_flops  # noqa: E402
from athena.models.trm import TinyRecursiveModel  # noqa: E402
from athena.models.trm.routing import routed_count  # noqa: E402
from athena.training.optimizers import AdamAtan2  # noqa: E402

# conf/arch/trm_small.yaml over TRMConfig's defaults (a test checks they agree).
TRM_SMALL = dict(hidden_size=64, num_heads=2, expansion=4.0, num_layers=2, H_cycles=2, L_cycles=3, halt_max_steps=8,
                 puzzle_emb_len=0, mixer="mlp")
TOY_ARCH = dict(hidden_size=32, num_heads=2, expansion=2.0, num_layers=2, H_cycles=2, L_cycles=2, halt_max_steps=4,
                puzzle_emb_len=0, mixer="mlp")
NO_FFN = 1e-3  # round(1e-3 x positions) = 0 for any puzzle here: the "no FFN" time ceiling


def routed_flops(arch: dict, seq_len: int, vocab_size: int, capacity: float) -> dict[str, float]:
    """Matmul FLOPs per sample of one supervision step, as athena.eval.flops counts them, with the channel FFN on
    round(c x L) of the L positions and the router's 2*L*D (capacity < 1). {"train": forward + backward (the last
    H cycle differentiated, backward = 2x forward), "eval": forward only, "ffn_train", "ffn_eval": the FFN part}."""
    D, L = arch["hidden_size"], arch["puzzle_emb_len"] + seq_len
    mixer, ffn = layer_flops(arch, seq_len, L if capacity >= 1 else routed_count(capacity, L))
    router = 0 if capacity >= 1 else 2 * L * D
    layers = arch["num_layers"]
    fwd_apps = arch["H_cycles"] * (arch["L_cycles"] + 1)
    train_apps = fwd_apps + 2 * (arch["L_cycles"] + 1)
    head = 2 * seq_len * D * vocab_size
    per_app = layers * (mixer + ffn + router)
    return {"train": float(per_app * train_apps + 3 * head), "eval": float(per_app * fwd_apps + head),
            "ffn_train": float(layers * ffn * train_apps), "ffn_eval": float(layers * ffn * fwd_apps)}


# ------------------------------------------------------------------------------------------------ training runs
def train_run(capacity: float, seed: int, run_dir: Path, data_root: Path, toy: bool, steps: int | None,
              device: str) -> dict:
    overrides = ["arch=trm_small", "data=sudoku6", f"arch.ffn_capacity={capacity}", f"seed={seed}", f"device={device}",
                 f"hydra.run.dir={run_dir}", f"data_root={data_root}"]
    if toy:
        overrides += [f"arch.{k}={v}" for k, v in TOY_ARCH.items() if k != "mixer"]
        overrides += ["data=sudoku4", "data.build.num_aug=1",
                      "train.global_batch_size=16", "train.lr_warmup_steps=1", "train.log_every=2",
                      "train.eval_every=null", "train.checkpoint_every=null", "train.eval_batch_size=16"]
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *overrides], cwd=ROOT, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"pretrain.py failed for capacity {capacity} seed {seed}: {proc.stderr[-2000:]}")
    final = json.loads((run_dir / "eval" / "final.json").read_text())
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    realised = [m["train/realised_capacity"] for m in logged if "train/realised_capacity" in m]
    z = [m["train/router_z_loss"] for m in logged if "train/router_z_loss" in m]
    config = json.loads((run_dir / "config.json").read_text())
    return {
        "capacity": capacity, "seed": seed, "run_dir": str(run_dir), "train_wall_s": wall,
        "steps": config["train"]["steps"],
        "exact_accuracy": final["exact_accuracy"], "token_accuracy": final["token_accuracy"],
        "exact_accuracy_at_halt": final["exact_accuracy_at_halt"], "mean_halt_steps": final["mean_halt_steps"],
        "exact_accuracy_by_step": final.get("exact_accuracy_by_step"), "test_count": final["count"],
        "realised_capacity": statistics.fmean(realised) if realised else 1.0,
        "router_z_loss_last": z[-1] if z else None,
    }


# ------------------------------------------------------------------------------------------------ timing
def puzzle_batch(batch: int, seq_len: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"inputs": torch.randint(1, vocab, (batch, seq_len), generator=g),
            "labels": torch.randint(1, vocab, (batch, seq_len), generator=g),
            "puzzle_identifiers": torch.zeros(batch, dtype=torch.int32)}


class Timer:
    """One model per capacity; `train_step()` / `eval_batch()` return seconds of one call. Routing counts do not
    depend on the weights, so random ones time the same as trained ones."""

    def __init__(self, arch: dict, capacity: float, seq_len: int, vocab: int, train_batch: int, eval_batch: int,
                 device: torch.device):
        torch.manual_seed(0)
        self.device = device
        self.model = TinyRecursiveModel(vocab, seq_len, 1, **arch, ffn_capacity=capacity).to(device)
        self.opt = AdamAtan2(self.model.parameters(), lr=1e-4)
        self.train_data = {k: v.to(device) for k, v in puzzle_batch(train_batch, seq_len, vocab, seed=1).items()}
        self.eval_data = {k: v.to(device) for k, v in puzzle_batch(eval_batch, seq_len, vocab, seed=2).items()}
        self.steps = arch["halt_max_steps"]
        _, self.autocast = autocast_for(device, "auto")  # as the recipe runs: bf16 autocast on CUDA, fp32 on CPU

    def _now(self) -> float:
        if self.device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def train_step(self) -> float:
        self.model.train()
        start = self._now()
        with self.autocast():
            _, out = self.model(self.model.initial_carry(self.train_data), self.train_data)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return self._now() - start

    @torch.no_grad()
    def eval_batch(self) -> float:
        self.model.eval()
        start = self._now()
        carry = self.model.initial_carry(self.eval_data)
        with self.autocast():
            for _ in range(self.steps):
                carry, out = self.model(carry, self.eval_data)
        out.logits.argmax(-1)
        return self._now() - start


def measure(arch: dict, capacities: list[float], seq_len: int, vocab: int, train_batch: int, eval_batch: int,
            repeats: int, warmup: int, device: torch.device) -> dict[float, dict]:
    timers = {c: Timer(arch, c, seq_len, vocab, train_batch, eval_batch, device) for c in capacities}
    samples: dict[float, dict[str, list[float]]] = {c: {"train": [], "eval": []} for c in capacities}
    for rep in range(warmup + repeats):
        for c, timer in timers.items():  # round-robin: drift on a shared machine hits every capacity alike
            t_train, t_eval = timer.train_step(), timer.eval_batch()
            if rep >= warmup:
                samples[c]["train"].append(t_train)
                samples[c]["eval"].append(t_eval)
    return {c: {"train_step_ms": 1e3 * statistics.median(s["train"]),
                "eval_batch_ms": 1e3 * statistics.median(s["eval"]),
                "train_step_ms_all": [round(1e3 * t, 2) for t in s["train"]],
                "eval_batch_ms_all": [round(1e3 * t, 2) for t in s["eval"]]} for c, s in samples.items()}


# ------------------------------------------------------------------------------------------------ report
def write_report(result: dict, out: Path, stem: str) -> None:
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = result["rows"]
    lines = [f"# TRM capacity study ({result['device']}, {result['date']})"
             + (" (PARTIAL: runs still to come)" if result["partial"] else ""), "",
             f"Command: `{result['command']}`  ", f"Threads: {result['threads']} (torch.get_num_threads); "
             f"{result['machine']}  ",
             f"Model: trm_small ({result['arch']}), data={result['data']}, {result['steps']} steps, seeds "
             f"{result['seeds']}. Timing: train batch {result['train_batch']}, eval batch {result['eval_batch']} "
             f"({result['arch']['halt_max_steps']} supervision steps), median of {result['repeats']} after "
             f"{result['warmup']} warm-up, capacities interleaved.", "",
             "| capacity | realised | exact acc (all steps) | exact acc @ Q halt | mean halt steps | train step ms "
             "| speedup | FLOP ceiling | eval batch ms | speedup | FLOP ceiling | FLOPs removed (train) "
             "| eval ms to the Q halt |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['capacity']} | {r['realised_capacity']:.3f} | {fmt_runs(r, 'exact_accuracy')} | "
            f"{fmt_runs(r, 'exact_accuracy_at_halt')} | {fmt_runs(r, 'mean_halt_steps', pct=False)} | "
            f"{r['train_step_ms']:.1f} | {r['train_speedup']:.3f}x | {r['train_flop_ceiling']:.3f}x | "
            f"{r['eval_batch_ms']:.1f} | {r['eval_speedup']:.3f}x | {r['eval_flop_ceiling']:.3f}x | "
            f"{100 * r['flop_share_removed_train']:.1f}% | {fmt(r['eval_ms_to_halt'], '.0f')} |")
    no_ffn = result["no_ffn"]
    lines += ["", f"No FFN at all (k = 0 positions routed; the time ceiling of FFN skipping as c -> 0): train step "
              f"{no_ffn['train_step_ms']:.1f} ms ({no_ffn['train_speedup']:.3f}x), eval batch "
              f"{no_ffn['eval_batch_ms']:.1f} ms ({no_ffn['eval_speedup']:.3f}x); FLOP ceiling "
              f"{no_ffn['train_flop_ceiling']:.3f}x / {no_ffn['eval_flop_ceiling']:.3f}x. "
              f"The FFN is {100 * result['ffn_flop_share_train']:.1f}% of a dense training step's matmul FLOPs.",
              "", "eval ms to the Q halt: the eval batch's time x mean halt steps / supervision steps, what inference "
              "costs when every puzzle stops where its Q head says halt (ACT, the vertical exit)."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(result, out / f"{stem}.png")


def fmt(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)  # NaN: no trained run (--skip-training)


def fmt_runs(row: dict, key: str, pct: bool = True) -> str:
    return " / ".join(fmt(run[key], ".1%") if pct else fmt(run[key], ".2f") for run in row["runs"])


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind, title in ((axes[0], "train", "training step"), (axes[1], "eval", "eval forward (8 steps)")):
        for r in result["rows"]:
            acc = statistics.fmean(run["exact_accuracy"] for run in r["runs"])
            ax.scatter(r[f"{kind}_speedup"], 100 * acc, color="C0", zorder=3)
            ax.scatter(r[f"{kind}_flop_ceiling"], 100 * acc, marker="x", color="C3", zorder=3)
            ax.plot([r[f"{kind}_speedup"], r[f"{kind}_flop_ceiling"]], [100 * acc] * 2, ":", color="grey")
            ax.annotate(f"c={r['capacity']}", (r[f"{kind}_speedup"], 100 * acc), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.axvline(result["no_ffn"][f"{kind}_speedup"], color="C2", ls="--", label="measured, no FFN at all")
        ax.axvline(1.0, color="black", lw=0.5)
        ax.scatter([], [], color="C0", label="measured speedup")
        ax.scatter([], [], marker="x", color="C3", label="FLOP ceiling")
        ax.set_xlabel(f"speedup over dense ({title}, {result['device']})")
        ax.set_ylabel("test exact accuracy (%)")
        ax.set_title(f"TRM {result['data']}: {title}")
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish_rows(result: dict, timings: dict, arch: dict, seq_len: int, vocab: int) -> None:
    dense_t = timings[1.0] if 1.0 in timings else None
    dense_f = routed_flops(arch, seq_len, vocab, 1.0)
    result["ffn_flop_share_train"] = dense_f["ffn_train"] / dense_f["train"]
    result["ffn_flop_share_eval"] = dense_f["ffn_eval"] / dense_f["eval"]

    def speed(c: float) -> dict:
        f = routed_flops(arch, seq_len, vocab, c)
        t = timings[c]
        return {**t, "flops_train": f["train"], "flops_eval": f["eval"],
                "flop_share_removed_train": 1 - f["train"] / dense_f["train"],
                "flop_share_removed_eval": 1 - f["eval"] / dense_f["eval"],
                "train_flop_ceiling": dense_f["train"] / f["train"], "eval_flop_ceiling": dense_f["eval"] / f["eval"],
                "train_speedup": dense_t["train_step_ms"] / t["train_step_ms"] if dense_t else float("nan"),
                "eval_speedup": dense_t["eval_batch_ms"] / t["eval_batch_ms"] if dense_t else float("nan")}

    rows = []
    for c in sorted({r["capacity"] for r in result["runs"]}, reverse=True):
        runs = [r for r in result["runs"] if r["capacity"] == c]
        row = {"capacity": c, "runs": runs,
               "realised_capacity": statistics.fmean(r["realised_capacity"] for r in runs), **speed(c)}
        # The vertical exit: one eval batch's time if every puzzle stopped at its Q-head halt (steps cost alike).
        halt = statistics.fmean(r["mean_halt_steps"] for r in runs)
        row["eval_ms_to_halt"] = row["eval_batch_ms"] * halt / arch["halt_max_steps"]
        rows.append(row)
    result["rows"] = rows
    result["no_ffn"] = speed(NO_FFN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for trm_capacity_<device>_<date>.json/.md/.png")
    parser.add_argument("--toy", action="store_true", help="tiny TRM on sudoku4, a few steps (plumbing only)")
    parser.add_argument("--capacities", default="1.0,0.75,0.5,0.25")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=None, help="train.steps (default: the recipe's, 1000)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="run folders (default: outputs/<stem>)")
    parser.add_argument("--data-root", type=Path, default=ROOT / "data")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per capacity (default 7; toy 2)")
    parser.add_argument("--skip-training", action="store_true",
                        help="timing and FLOPs only; with --add-to: rewrite that record's table and plot")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where both the training runs and the timing run (cuda: bf16 autocast, as the recipe)")
    parser.add_argument("--add-to", type=Path, default=None,
                        help="an earlier record (its .json): add these runs (e.g. another seed) to it, keep its timing")
    args = parser.parse_args()

    capacities = [float(c) for c in args.capacities.split(",")]
    if 1.0 not in capacities and args.add_to is None:
        capacities = [1.0, *capacities]  # the dense reference of every speedup (an --add-to record has it)
    seeds = [int(s) for s in args.seeds.split(",")]
    arch = TOY_ARCH if args.toy else TRM_SMALL
    seq_len, vocab = (16, 6) if args.toy else (36, 8)  # sudoku4 / sudoku6: cells, pad + digits (+1)
    train_batch, eval_batch = (16, 16) if args.toy else (128, 128)
    repeats = args.repeats or (2 if args.toy else 7)
    warmup = 1 if args.toy else 2
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA GPU is visible; use --device cpu")
    stem = f"trm_capacity{'_toy' if args.toy else ''}_{args.device}_{date}"
    args.out.mkdir(parents=True, exist_ok=True)
    runs_dir = args.runs_dir or ROOT / "outputs" / stem
    if args.add_to is not None:  # more runs for an earlier record: same timing, same files
        result = json.loads(args.add_to.read_text())
        stem, args.out = args.add_to.stem, args.add_to.parent
        result["partial"] = True
        result["seeds"] = sorted({*result["seeds"], *seeds})
        result["command"] += " ; python " + " ".join(sys.argv)
        timings = {float(c): t for c, t in result["timings"].items()}
        arch = result["arch"]
        runs_dir = args.runs_dir or ROOT / "outputs" / stem
    else:
        result = {
            "partial": True, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "date": date, "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}", "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "command": "python " + " ".join(sys.argv),
            "arch": arch, "data": "sudoku4 (toy)" if args.toy else "sudoku6", "seeds": seeds,
            "steps": args.steps or (None if args.toy else 1000), "train_batch": train_batch, "eval_batch": eval_batch,
            "repeats": repeats, "warmup": warmup, "runs": [],
        }
        # Timing first (a few minutes at most): a study cut short by a deadline still has its speed columns.
        timings = measure(arch, sorted({*capacities, NO_FFN}, reverse=True), seq_len, vocab, train_batch,
                          eval_batch, repeats, warmup, device)
        result["timings"] = {str(c): t for c, t in timings.items()}
        print("[trm_capacity] timing (ms, median): " + ", ".join(
            f"c={c}: train {t['train_step_ms']:.1f}, eval {t['eval_batch_ms']:.1f}" for c, t in timings.items()),
            flush=True)
    if args.skip_training and args.add_to is None:
        result["runs"] = [{"capacity": c, "seed": None, "exact_accuracy": float("nan"),
                           "exact_accuracy_at_halt": float("nan"), "mean_halt_steps": float("nan"),
                           "realised_capacity": routed_count(c, seq_len) / seq_len if c < 1 else 1.0}
                          for c in capacities]
    for seed in [] if args.skip_training else seeds:
        for c in capacities:
            run = train_run(c, seed, runs_dir / f"c{c}_s{seed}", args.data_root, args.toy, args.steps, args.device)
            result["runs"].append(run)
            print(f"[trm_capacity] c={c} seed={seed}: exact {run['exact_accuracy']:.4f}, at halt "
                  f"{run['exact_accuracy_at_halt']:.4f} after {run['mean_halt_steps']:.2f} steps, realised "
                  f"{run['realised_capacity']:.3f}, {run['train_wall_s']:.0f} s", flush=True)
            finish_rows(result, timings, arch, seq_len, vocab)
            write_report(result, args.out, stem)  # after every run: a study cut short keeps its rows
    finish_rows(result, timings, arch, seq_len, vocab)
    result["partial"] = False
    write_report(result, args.out, stem)
    print(f"[trm_capacity] wrote {args.out / stem}.json/.md/.png", flush=True)


if __name__ == "__main__":
    main()
