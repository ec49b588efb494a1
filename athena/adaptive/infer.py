"""Generate, tune and time a run's adaptive model from its checkpoint.

    python -m athena.adaptive.infer --checkpoint outputs/.../last.pt --prompt "The future of AI is" --capacity 0.5
    python -m athena.adaptive.infer --checkpoint ... --prompt "..." --target-speedup 1.6  # bisection on measured time
    python -m athena.adaptive.infer --checkpoint ... --benchmark                            # capacity sweep table

The checkpoint is a pretrain.py run's (`exit=hierarchical`, or a plain causal LM, wrapped here with untrained
routers and no exits: then the table is a lower bound on quality). Its data folder gives the tokenizer and, for the
benchmark's perplexity column, the held-out split. Timing is the prefill of --batch x --seq-len random tokens
(median of --repeats, CUDA events on a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from athena.errors import AthenaError

CAPACITIES = (1.0, 0.9, 0.7, 0.55, 0.4)


def load_adaptive(checkpoint: str, device: torch.device):
    """(wrapper, run config, data folder) from a pretrain.py checkpoint."""
    from athena.adaptive.wrapper import HierarchicalAdaptiveWrapper
    from athena.checkpoint import CheckpointError, load_checkpoint, load_weights, model_weights, resolve_checkpoint_path
    from athena.config import validate_config
    from athena.data.build import ensure_dataset
    from athena.data.format import PuzzleDataset
    from athena.models.build import build_run_model

    path = resolve_checkpoint_path(checkpoint)
    state = load_checkpoint(path)
    if not state.get("config"):
        raise CheckpointError(f"{path} carries no run config; give a checkpoint written by pretrain.py")
    run_cfg = validate_config(dict(state["config"]))
    data_dir = ensure_dataset(run_cfg.dataset_dir(), dict(run_cfg.data.build))
    model = build_run_model(run_cfg, PuzzleDataset(data_dir, "test").metadata, load_init=False)
    load_weights(model, model_weights(state, "ema" if state.get("ema") else "raw"), str(path))
    if not isinstance(model, HierarchicalAdaptiveWrapper):
        print(f"note: {path} was trained without exit=hierarchical: untrained routers, no exits")
        model = HierarchicalAdaptiveWrapper(model, exit_layers=[])
    return model.to(device).eval(), run_cfg, data_dir


def prefill_timer(model, device, batch: int, seq_len: int, repeats: int, exits: bool = True):
    """time_at(capacity) -> median seconds of one top-k prefill of random tokens."""
    from athena.adaptive.speed import measure_seconds

    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    saved = model.exits_enabled

    @torch.no_grad()
    def time_at(capacity: float) -> float:
        model.capacity, model.exits_enabled = capacity, exits and saved
        try:
            return measure_seconds(lambda: model(ids), device, repeats=repeats)
        finally:
            model.exits_enabled = saved

    return time_at


@torch.no_grad()
def held_out_perplexity(model, data_dir: Path, device, max_sequences: int = 64) -> float:
    from athena.data.format import PuzzleDataset

    all_inputs, all_labels = PuzzleDataset(data_dir, "test").tokens()
    count = min(len(all_inputs), max_sequences)
    inputs = torch.as_tensor(all_inputs[:count].astype("int64")).to(device)
    labels = torch.as_tensor(all_labels[:count].astype("int64")).to(device)
    nll, tokens = 0.0, 0
    for start in range(0, count, 16):
        logits = model(inputs[start:start + 16]).logits[:, :-1].float()
        target = labels[start:start + 16, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                               reduction="sum").item()
        tokens += int((target != -100).sum())
    return math.exp(nll / max(tokens, 1))


def benchmark(model, data_dir, device, args) -> list[dict]:
    from athena.adaptive.speed import Shapes, flop_ceiling

    rows = []
    shapes = Shapes.of(model.config)
    for exits in ((True, False) if model.exit_layers else (False,)):
        time_at = prefill_timer(model, device, args.batch, args.seq_len, args.repeats, exits=exits)
        dense = time_at(1.0)
        for capacity in CAPACITIES:
            model.capacity, model.exits_enabled = capacity, exits
            seconds = dense if capacity == 1.0 else time_at(capacity)
            ppl = held_out_perplexity(model, data_dir, device)
            stats = model.last_stats
            profile = {layer: n / stats.tokens for layer, n in zip(model.exit_layers, stats.exits)} if exits else {}
            rows.append({"capacity": capacity, "exits": exits, "prefill_ms": 1000 * seconds,
                         "speedup": dense / seconds, "flop_ceiling": flop_ceiling(shapes, args.seq_len, capacity,
                                                                                   profile),
                         "perplexity": ppl, "mean_depth": depth_share(model, stats)})
    return rows


def depth_share(model, stats) -> float:
    depth = len(model.parts.layers)
    ran_all = stats.tokens - sum(stats.exits)
    return (sum(l * n for l, n in zip(model.exit_layers, stats.exits)) + depth * ran_all) / (depth * stats.tokens)


def print_table(rows: list[dict]) -> None:
    print(f"{'capacity':>8} {'exits':>5} {'prefill ms':>10} {'speedup':>7} {'FLOP ceil':>9} {'ppl':>9} {'depth':>5}")
    for r in rows:
        print(f"{r['capacity']:>8.2f} {str(r['exits']):>5} {r['prefill_ms']:>10.2f} {r['speedup']:>7.2f} "
              f"{r['flop_ceiling']:>9.2f} {r['perplexity']:>9.2f} {r['mean_depth']:>5.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m athena.adaptive.infer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a pretrain.py checkpoint (or run folder)")
    parser.add_argument("--prompt", help="text to continue (greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--capacity", type=float, help="FFN capacity (default: the run's)")
    parser.add_argument("--target-speedup", type=float, help="pick the capacity whose measured prefill speedup "
                        "reaches this (bisection)")
    parser.add_argument("--benchmark", action="store_true", help="sweep capacities: time, FLOP ceiling, perplexity")
    parser.add_argument("--no-exits", action="store_true", help="switch the exit gates off")
    parser.add_argument("--batch", type=int, default=8, help="timing batch")
    parser.add_argument("--seq-len", type=int, default=256, help="timing sequence length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (AthenaError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def run(args) -> int:
    if not (args.prompt or args.benchmark):
        raise AthenaError("nothing to do: give --prompt TEXT (with --capacity or --target-speedup) or --benchmark")
    if args.capacity is not None and not 0 < args.capacity <= 1:
        raise AthenaError(f"--capacity must be in (0, 1], got {args.capacity}")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    model, run_cfg, data_dir = load_adaptive(args.checkpoint, device)
    if args.no_exits:
        model.exits_enabled = False
    results: dict = {}
    if args.benchmark:
        results["benchmark"] = benchmark(model, data_dir, device, args)
        print_table(results["benchmark"])
    if args.capacity is not None:
        model.capacity = args.capacity
    if args.target_speedup is not None:
        from athena.adaptive.speed import search_capacity_for_speedup

        found = search_capacity_for_speedup(args.target_speedup, prefill_timer(model, device, args.batch, args.seq_len,
                                                                               args.repeats))
        model.capacity = found.capacity
        verdict = "reached" if found.reached else "not reachable; lowest capacity tried"
        print(f"target speedup {args.target_speedup:.2f}x: capacity {found.capacity:.3f} ({found.speedup:.2f}x "
              f"measured, {verdict}; {len(found.trace)} timings)")
        results["search"] = {"capacity": found.capacity, "speedup": found.speedup, "reached": found.reached,
                             "trace": found.trace}
    if args.prompt:
        from athena.eval.lm_eval import data_tokenizer

        tokenizer = data_tokenizer(data_dir)
        ids = torch.tensor([tokenizer(args.prompt).input_ids], device=device)
        model.calibrate(ids) if model.routing == "topk" and not bool(model.routers[0].threshold_seen) else None
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        print(f"capacity {model.capacity:.2f}, exits {'on' if model.exits_enabled and model.exit_layers else 'off'}:")
        print(args.prompt + text)
        results["generation"] = {"prompt": args.prompt, "text": text, "capacity": model.capacity}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
