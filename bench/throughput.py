"""Training throughput of Athena's TRM against the official TRM and nano-trm, on one GPU.

    python bench/throughput.py --impls athena official nano --recipes sudoku_att sudoku_mlp grid30_att \
        --official-dir .ref/official --nano-dir .ref/nano --out docs/results/throughput/throughput.json

Athena is timed on its real training loop (`PretrainRecipe.train`: DataLoader feeding, carry, loss, backward,
gradient clipping, both optimisers, EMA, device-side metrics and the log-step sync), on a synthetic dataset of the
recipe's shape (`data=synthetic`: the cost depends only on the shapes). The references are timed on one step of
their own model, loss head and optimisers with batches already on the GPU (bench/references.py), which is
less work than ours. Warm-up steps (compilation included) are excluded; the timed steps end with a device sync.

MFU = model FLOPs per second / the GPU's dense bf16 peak. Model FLOPs (matmuls only, 2 per multiply-add) per
sample and supervision step are counted from the config, see `athena.eval.flops.flops_per_sample_step`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from athena.eval.flops import flops_per_sample_step  # noqa: E402 - after the path line: bench/ runs as a script

# recipe -> (Athena arch config, data shape, batch); sizes of the TRM paper.
RECIPES = {
    "sudoku_att": dict(arch="athena_trm", seq_len=81, vocab_size=11, batch=768),
    "sudoku_mlp": dict(arch="athena_trm_mlp", seq_len=81, vocab_size=11, batch=768),
    # 768 samples of 916 positions do not fit in 80 GB; the official ARC recipe runs 768 over 4 GPUs = 192 each.
    "grid30_att": dict(arch="athena_trm", seq_len=900, vocab_size=12, batch=192),
}

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16 = {"H100 80GB HBM3": 989.4e12, "H100 PCIe": 756.5e12, "H100": 989.4e12, "H200": 989.4e12,
             "A100": 312e12, "L40S": 362e12}


def peak_flops() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def athena_config(recipe: str, overrides: list[str], steps: int) -> dict:
    from athena.config import compose_config

    spec = RECIPES[recipe]
    return compose_config([
        "experiment=sudoku_extreme_1k", f"arch={spec['arch']}", "data=synthetic",
        f"data.build.seq_len={spec['seq_len']}", f"data.build.vocab_size={spec['vocab_size']}",
        f"train.global_batch_size={spec['batch']}", f"train.steps={steps}", "train.epochs=null",
        "train.eval_every=null", "train.checkpoint_every=null", "train.lr_warmup_steps=0",
        *overrides])


def athena_trainer(recipe: str, overrides: list[str], warmup: int, steps: int):
    """Athena's real training loop for `recipe`, set up and run for `warmup` steps (compiles); `steps` more may
    follow (trainer.total_steps = warmup + steps; trainer.train())."""
    import logging

    from athena.config import validate_config
    from athena.training.recipe import PretrainRecipe

    logging.basicConfig(level=logging.WARNING)
    config = athena_config(recipe, overrides, warmup + steps)
    cfg = validate_config(config)
    trainer = PretrainRecipe(cfg, Path(tempfile.mkdtemp(prefix=f"bench_{recipe}_")))
    trainer.setup()
    trainer.total_steps = warmup
    trainer.train()
    return trainer


def time_athena(recipe: str, warmup: int, steps: int, overrides: list[str], profile_dir: Path | None) -> dict:
    """Warm up (compiles), then time `steps` steps of the real training loop."""
    trainer = athena_trainer(recipe, overrides, warmup, steps)
    cfg = trainer.cfg
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.total_steps = warmup + steps
    start = time.perf_counter()
    trainer.train()
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan")
    if "reduce-overhead" in cfg.train.compile_mode:
        peak = None  # as for the references: the CUDA-graph pool was allocated during warm-up
    if profile_dir is not None:
        profile_steps(lambda: trainer._train_step(next_batch(trainer)), profile_dir / f"athena_{recipe}")
    trainer.close()
    return dict(seconds=seconds, steps=steps, peak_mem_gb=peak, batch=cfg.train.global_batch_size,
                arch=cfg.arch.model_dump(), compiled=cfg.train.compile, compile_mode=cfg.train.compile_mode)


def next_batch(trainer) -> dict:
    if not hasattr(trainer, "_bench_iter"):
        trainer._bench_iter = iter(trainer.train_loader)
    batch = next(trainer._bench_iter)
    batch.pop("position")
    return {k: v.to(trainer.device, non_blocking=True) for k, v in batch.items()}


def reference_step(impl: str, recipe: str, ref_dir: str, compile: bool):
    """One training step of the official TRM or nano-trm at `recipe`'s sizes (bench/references.py)."""
    from bench import references

    spec = RECIPES[recipe]
    arch = athena_config(recipe, [], 1)["arch"]
    builder = references.build_official_step if impl == "official" else references.build_nano_trm_step
    step, _ = builder(ref_dir, "att" if arch["mixer"] == "attention" else "mlp", seq_len=spec["seq_len"],
                      vocab_size=spec["vocab_size"], batch_size=spec["batch"], num_puzzle_identifiers=2,
                      device="cuda" if torch.cuda.is_available() else "cpu", compile=compile,
                      hidden_size=arch["hidden_size"], num_heads=arch["num_heads"], H_cycles=arch["H_cycles"],
                      L_cycles=arch["L_cycles"], puzzle_emb_len=arch["puzzle_emb_len"],
                      halt_max_steps=arch["halt_max_steps"])
    return step, spec, arch


def time_reference(impl: str, recipe: str, warmup: int, steps: int, ref_dir: str, compile: bool) -> dict:
    step, spec, arch = reference_step(impl, recipe, ref_dir, compile)
    for _ in range(warmup):
        step()
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    mode = getattr(step, "info", {}).get("compile_mode", "default")
    peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan")
    if mode and "reduce-overhead" in mode:
        peak = None  # CUDA graphs allocate their pool during warm-up, so the peak after the reset says nothing
    return dict(seconds=seconds, steps=steps, peak_mem_gb=peak, batch=spec["batch"], arch=arch, compiled=compile,
                compile_mode=mode)


def profile_steps(step, out: Path, n: int = 3) -> None:
    """A torch.profiler table of the busiest kernels over n steps (GPU time), next to the results."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    step()
    sync()
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
        sync()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    out.with_suffix(".txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90))


def record(impl: str, recipe: str, variant: str, timing: dict) -> dict:
    spec = RECIPES[recipe]
    step_s = timing["seconds"] / timing["steps"]
    samples_per_s = timing["batch"] / step_s
    flops = flops_per_sample_step(timing["arch"], spec["seq_len"], spec["vocab_size"])
    peak = peak_flops()
    return dict(impl=impl, recipe=recipe, variant=variant, device=device_name(), torch=torch.__version__,
                batch=timing["batch"], compiled=timing["compiled"], compile_mode=timing["compile_mode"],
                samples_per_s=round(samples_per_s, 1), step_ms=round(1000 * step_s, 2),
                peak_mem_gb=None if timing["peak_mem_gb"] is None else round(timing["peak_mem_gb"], 2),
                gflop_per_sample_step=round(flops / 1e9, 2),
                mfu=round(samples_per_s * flops / peak, 4) if peak else None, timed_steps=timing["steps"])


def save(records: list[dict], path: Path) -> None:
    """Merge into the JSON list at `path`: a new record replaces an old one of the same impl/recipe/variant/device."""
    old = json.loads(path.read_text()) if path.is_file() else []
    key = lambda r: (r["impl"], r["recipe"], r.get("variant", ""), r["device"])  # noqa: E731
    new_keys = {key(r) for r in records}
    merged = [r for r in old if key(r) not in new_keys] + records
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", nargs="+", default=["athena"], choices=["athena", "official", "nano"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--batch", type=int, default=None, help="override the recipes' batch of 768 (smoke tests)")
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eager", action="store_true", help="no torch.compile (all implementations)")
    parser.add_argument("--variant", default="", help="a label for this Athena configuration (e.g. max-autotune)")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for Athena")
    parser.add_argument("--official-dir", default=".ref/official")
    parser.add_argument("--nano-dir", default=".ref/nano")
    parser.add_argument("--profile", type=Path, default=None, help="write a kernel table per Athena recipe here")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/throughput/throughput.json")
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    if args.batch:
        for spec in RECIPES.values():
            spec["batch"] = args.batch

    records = []
    for recipe in args.recipes:
        for impl in args.impls:
            variant = args.variant if impl == "athena" else ""
            variant = (variant + ("-eager" if args.eager else "")).strip("-")
            try:
                if impl == "athena":
                    overrides = args.override + (["train.compile=false"] if args.eager else [])
                    timing = time_athena(recipe, args.warmup, args.steps, overrides, args.profile)
                else:
                    ref_dir = args.official_dir if impl == "official" else args.nano_dir
                    timing = time_reference(impl, recipe, args.warmup, args.steps, ref_dir, compile=not args.eager)
            except Exception as error:  # one failing implementation must not lose the others' numbers
                print(f"[bench] {impl} {recipe}: failed: {type(error).__name__}: {str(error)[:500]}", flush=True)
                continue
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            rec = record(impl, recipe, variant, timing)
            records.append(rec)
            save([rec], args.out)  # as we go: a run cut short keeps what it measured
            print(f"[bench] {json.dumps(rec)}", flush=True)
    for r in records:
        if r["impl"] == "athena":
            for other in records:
                if other["impl"] != "athena" and other["recipe"] == r["recipe"]:
                    print(f"[bench] {r['recipe']} athena{('/' + r['variant']) if r['variant'] else ''} vs "
                          f"{other['impl']}: {r['samples_per_s'] / other['samples_per_s']:.2f}x samples/s, "
                          + (f"{r['peak_mem_gb'] / other['peak_mem_gb']:.2f}x peak memory" if other["peak_mem_gb"]
                             else "peak memory not comparable"), flush=True)


if __name__ == "__main__":
    main()
