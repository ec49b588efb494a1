"""What one TRM training step keeps for backward: a tally of the tensors autograd saves, per sample.

Peak training memory at batch 768 is almost all saved activations, so comparing these tallies finds where two
implementations (or two adapter methods) differ without a GPU. Each unique storage is counted once; the table
groups them by dtype and shape.

    python bench/saved_activations.py                           # Athena TRM-MLP, compiled, bf16 autocast, batch 24
    python bench/saved_activations.py --impl official           # the official TRM-MLP (code under .ref/official)
    python bench/saved_activations.py --stream-dtype float32    # Athena with arch.stream_dtype=float32 (fp32 stream)
    python bench/saved_activations.py --adapter poly --eager    # an adapter on Athena's TRM (eager)
    python bench/saved_activations.py --adapter poly --eager --ia3-recompute   # IA3 recomputes base(x) in backward
    python bench/saved_activations.py --tiny                    # toy size (plumbing check, seconds)

Runs on the CPU (compilation needs a C++ compiler there); the tally is the same on a GPU up to allocator
rounding. The official model runs in its own forward_dtype=bfloat16, Athena under bf16 autocast, as in training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tally(fn):
    """Run fn(); returns ({(dtype, shape): bytes} over the unique storages autograd saved during it, fn's result)."""
    seen: dict[int, tuple[int, str, tuple[int, ...]]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen.setdefault(storage.data_ptr(), (storage.nbytes(), str(t.dtype).removeprefix("torch."), tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    groups: dict[tuple[str, tuple[int, ...]], int] = {}
    for nbytes, dtype, shape in seen.values():
        groups[(dtype, shape)] = groups.get((dtype, shape), 0) + nbytes
    return groups, result


def athena_step(args):
    from athena.models.trm import TinyRecursiveModel

    size = dict(hidden_size=32, num_heads=2, H_cycles=1, L_cycles=1, puzzle_emb_len=2) if args.tiny else \
        dict(hidden_size=512, num_heads=8, H_cycles=3, L_cycles=6, puzzle_emb_len=16)
    torch.manual_seed(0)
    model = TinyRecursiveModel(vocab_size=11, seq_len=81, num_puzzle_identifiers=2, num_layers=2, halt_max_steps=16,
                               mixer=args.mixer, expansion=4.0, halt_exploration_prob=0.1,
                               stream_dtype=args.stream_dtype, **size)
    if args.adapter != "none":
        from athena.adapters import AdapterConfig, add_adapters

        model = add_adapters(model, AdapterConfig(method=args.adapter, rank=8, alpha=16, num_experts=4, top_k=2,
                                                  bottleneck_size=64, ia3_recompute=args.ia3_recompute))
    gen = torch.Generator().manual_seed(0)
    batch = {"inputs": torch.randint(1, 11, (args.batch, 81), generator=gen),
             "labels": torch.randint(2, 11, (args.batch, 81), generator=gen),
             "puzzle_identifiers": torch.zeros(args.batch, dtype=torch.long)}
    forward = model if args.eager else torch.compile(model)
    model.train()
    state = {"carry": model.initial_carry(batch)}

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            state["carry"], out = forward(state["carry"], batch)
        return out.loss

    return step


def official_step(args):
    from bench import references

    step, model = references.build_official_step(args.official_dir, "mlp" if args.mixer == "mlp" else "att",
                                                 seq_len=81, vocab_size=11, batch_size=args.batch,
                                                 num_puzzle_identifiers=2, device="cpu", compile=not args.eager)
    return step  # the official step runs its own backward and optimiser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["athena", "official"], default="athena")
    parser.add_argument("--mixer", choices=["mlp", "attention"], default="mlp")
    parser.add_argument("--adapter", default="none", help="athena only: none | lora | ia3 | moe | poly | hybrid")
    parser.add_argument("--stream-dtype", choices=["float32", "autocast"], default="autocast",
                        help="athena only: arch.stream_dtype (autocast = bf16 states and residual stream)")
    parser.add_argument("--ia3-recompute", action="store_true", help="athena adapters: adapter.ia3_recompute=true")
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--eager", action="store_true", help="no torch.compile")
    parser.add_argument("--tiny", action="store_true", help="toy-size Athena model")
    parser.add_argument("--official-dir", default=".ref/official")
    parser.add_argument("--top", type=int, default=12, help="rows of the table")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    step = athena_step(args) if args.impl == "athena" else official_step(args)
    for _ in range(2):  # compile, and reach the steady carry (slots no longer all fresh)
        loss = step()
        if loss is not None:
            loss.backward()
    groups, loss = tally(step)
    if loss is not None:
        loss.backward()
    total = sum(groups.values())
    stream = f" stream={args.stream_dtype}" if args.impl == "athena" else ""
    recompute = " ia3_recompute" if args.ia3_recompute else ""
    print(f"{args.impl} {args.mixer} adapter={args.adapter}{recompute}{stream} {'eager' if args.eager else 'compiled'} "
          f"batch {args.batch}: "
          f"{total / args.batch / 2**20:.1f} MB saved per sample ({len(groups)} dtype/shape groups)")
    print("| dtype | shape | MB per sample |\n|---|---|---|")
    for (dtype, shape), nbytes in sorted(groups.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {dtype} | {tuple(shape)} | {nbytes / args.batch / 2**20:.2f} |")


if __name__ == "__main__":
    main()
