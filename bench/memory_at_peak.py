"""What is allocated at the moment of peak GPU memory in one training step, Athena's or the official TRM's.

    python3 bench/memory_at_peak.py --impl athena --recipe sudoku_mlp --out docs/results/memory_at_peak/athena.md
    python3 bench/memory_at_peak.py --impl official --recipe sudoku_mlp --out docs/results/memory_at_peak/official.md

After warm-up (compilation), the CUDA caching allocator records every allocation and free with its Python stack
(`torch.cuda.memory._record_memory_history`) over --steps steps. Replaying that trace finds the moment of the most
bytes allocated; the report lists what was live then, grouped by the innermost stack frame that is not PyTorch's
own (a line of Athena's, the reference's, or of an Inductor-generated kernel wrapper), largest first. Memory
allocated before the recording started (parameters, optimiser state, the first carry) has no stack and is
reported as one line. GPU only.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_TORCH_INTERNAL = ("/torch/", "/site-packages/torch", "<frozen", "/contextlib.py", "/functools.py")


def _where(frames: list[dict]) -> str:
    """The innermost frame outside PyTorch's own modules (Inductor's generated code lives under /tmp and counts
    as outside), as file:line name."""
    for f in frames:
        name = f.get("filename", "?")
        if not any(part in name for part in _TORCH_INTERNAL) or "torchinductor" in name:
            return f"{Path(name).name}:{f.get('line', '?')} {f.get('name', '?')}"
    return "(PyTorch internals only)" if frames else "(no stack)"


def live_at_peak(events: list[dict], allocated_before: int) -> tuple[int, list[tuple[int, str]], int]:
    """Replay one device's allocator trace. Returns (peak bytes allocated, [(bytes, where)] of the blocks allocated
    during the trace and live at the peak, bytes still live then of those allocated before it)."""
    live: dict[int, tuple[int, str]] = {}
    before, total = allocated_before, allocated_before
    peak, peak_live, peak_before = total, [], before
    for e in events:
        action, addr, size = e.get("action"), e.get("addr"), e.get("size", 0)
        if action == "alloc":
            live[addr] = (size, _where(e.get("frames", [])))
            total += size
            if total >= peak:  # the last of equal peaks: blocks carried over from earlier recorded steps have stacks
                peak, peak_live, peak_before = total, list(live.values()), before
        elif action == "free_completed":
            if addr in live:
                total -= live.pop(addr)[0]
            else:  # a block from before the recording
                before -= size
                total -= size
    return peak, peak_live, peak_before


def report(peak: int, blocks: list[tuple[int, str]], before: int, title: str) -> str:
    """Live blocks at the peak: totals by block size (compare two reports here first), then every site."""
    gb = lambda b: f"{b / 1e9:8.3f}"  # noqa: E731
    by_size: dict[int, list[int]] = defaultdict(list)
    by_site: dict[str, int] = defaultdict(int)
    for size, where in blocks:
        by_size[size].append(size)
        by_site[f"{where} ({size / 1e6:.1f} MB)"] += size
    lines = [f"# {title}", f"peak allocated {gb(peak)} GB", f"{gb(before)} GB  allocated before the recording",
             f"{gb(sum(size for size, _ in blocks))} GB  allocated during it, live at the peak", "",
             "## by block size", "| block MB | count | GB |", "|---|---|---|"]
    for size, sizes in sorted(by_size.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"| {size / 1e6:.2f} | {len(sizes)} | {sum(sizes) / 1e9:.4f} |")
    lines += ["", "## by site"]
    lines += [f"{gb(size)} GB  {where}" for where, size in sorted(by_site.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["athena", "official"], default="athena")
    parser.add_argument("--recipe", default="sudoku_mlp")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--official-dir", default=".ref/official")
    parser.add_argument("--override", nargs="*", default=[], help="Athena config overrides")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: bench/memory_at_peak.py records the CUDA allocator; run it on a GPU machine")

    from bench import throughput

    if args.impl == "athena":
        trainer = throughput.athena_trainer(args.recipe, args.override, args.warmup, 0)  # warmed up (compiled)
        step = lambda: trainer._train_step(throughput.next_batch(trainer))  # noqa: E731
    else:
        step, _, _ = throughput.reference_step("official", args.recipe, args.official_dir, compile=True)
        for _ in range(args.warmup):
            step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    allocated_before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = snapshot["device_traces"][torch.cuda.current_device()]
    peak, blocks, before = live_at_peak(events, allocated_before)
    title = (f"{args.impl} {args.recipe} {' '.join(args.override)}: {args.steps} steps after {args.warmup} warm-up, "
             f"{torch.cuda.get_device_name()}; max_memory_allocated {torch.cuda.max_memory_allocated() / 1e9:.3f} GB")
    text = report(peak, blocks, before, title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print("\n".join(text.splitlines()[:30]))


if __name__ == "__main__":
    main()
