"""Write the official TRM's numbers for tests/models/test_official_reference.py, so that comparison runs everywhere.

    python bench/official_reference.py --official-dir .ref/official --official-commit <its git commit>

Run by hand, once, where the official code is checked out (git-ignored `.ref/official`, never committed); CI only
reads what this writes. Per mixer it builds the official `TinyRecursiveReasoningModel_ACTV1` + `ACTLossHead` at a
tiny size (bench/compare_official.py's `build`, with weights on the puzzle embedding and Q head), rounds every
weight to float16 values (stored exactly at half the bytes; both models then compute in float32), and runs STEPS
deep-supervision steps in training mode on one batch, with `torch.manual_seed(SEED + step)` before each step so
that halting exploration draws the same numbers wherever it is replayed. On the CPU, float32, eager.

tests/models/reference/official_trm_<mixer>.safetensors holds:
    weight.<name>             every weight and buffer under Athena's names (float16; load as float32)
    batch.<key>               inputs, labels (-100 = no loss), puzzle_identifiers
    step<k>.<output>          logits, q_halt_logits, halted, steps, loss of step k (k = 0..STEPS-1)
    grad.<name>               each parameter's gradient summed over the steps (float32); the puzzle embedding's
                              per-batch-row gradient summed per puzzle id, as Athena's sparse gradient holds it
and in its metadata: athena_config (TinyRecursiveModel's arguments, JSON), seed, steps, official_commit, torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.compare_official import (athena_config, build, copy_weights, official_gradients,  # noqa: E402
                                    official_weights, zero_official_grads)

OUT_DIR = ROOT / "tests" / "models" / "reference"
# Tiny, so both files together stay ~200 KB: SwiGLU widths round up to 256 whatever the hidden size, so the MLPs
# (3 * 256 * (hidden + sequence) weights per layer for TRM-MLP) dominate.
SIZE = dict(seq_len=4, vocab_size=6, batch_size=8, num_puzzle_identifiers=3, hidden_size=8, num_heads=2,
            H_cycles=2, L_cycles=2, puzzle_emb_len=2, halt_max_steps=3)
EXPLORATION = 0.5  # above the recipes' 0.1 so that exploration decides some slots within a few steps
STEPS = 4  # with halt_max_steps 3: halts on the Q head, forced halts at 3 and fresh slots all happen
SEED = 100
# A halting logit this close to 0 could flip sign under another machine's float32 round-off.
MIN_HALT_MARGIN = 1e-3


def reference_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    B, S, V = SIZE["batch_size"], SIZE["seq_len"], SIZE["vocab_size"]
    labels = torch.randint(2, V, (B, S), generator=gen)
    labels[:, 0] = -100  # a given cell carries no loss, as in Sudoku
    return {"inputs": torch.randint(1, V, (B, S), generator=gen), "labels": labels,
            "puzzle_identifiers": torch.randint(0, SIZE["num_puzzle_identifiers"], (B,), generator=gen)}


def run_official(official, athena, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """STEPS steps of the official model: per-step outputs and the summed gradients, under the file's keys."""
    official.train()
    official_batch = {k: v.to(torch.int32) for k, v in batch.items()}
    carry = official.initial_carry(official_batch)
    tensors: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    for step in range(STEPS):
        torch.manual_seed(SEED + step)
        carry, loss, _, outputs, _ = official(carry=carry, batch=official_batch,
                                              return_keys=["logits", "q_halt_logits"])
        q = outputs["q_halt_logits"]
        if q.abs().min() < MIN_HALT_MARGIN:
            raise SystemExit(f"error: step {step}: a halting logit is {q.abs().min():.1e} from 0; pick another SEED")
        tensors.update({f"step{step}.logits": outputs["logits"], f"step{step}.q_halt_logits": q.detach(),
                        f"step{step}.halted": carry.halted, f"step{step}.steps": carry.steps,
                        f"step{step}.loss": loss.detach().reshape(1)})
        zero_official_grads(official)
        loss.backward()
        for name, grad in official_gradients(official, athena).items():
            grads[name] = grad.clone() if name not in grads else grads[name] + grad
    tensors.update({f"grad.{name}": g for name, g in grads.items()})
    return tensors


def check_exercised(tensors: dict[str, torch.Tensor]) -> None:
    """The reference is only worth keeping if halting on the Q head, forced halts, exploration and fresh slots
    all happen in it."""
    by_q = forced = explored = False
    for step in range(STEPS):
        halted, steps = tensors[f"step{step}.halted"], tensors[f"step{step}.steps"]
        q = tensors[f"step{step}.q_halt_logits"]
        forced |= bool((halted & (steps == SIZE["halt_max_steps"])).any())
        by_q |= bool((halted & (steps < SIZE["halt_max_steps"])).any())
        explored |= bool((~halted & (q > 0)).any())  # wanted to halt, kept running: exploration's minimum
    fresh = bool((tensors[f"step{STEPS - 1}.steps"] == 1).any())
    if not (by_q and forced and explored and fresh):
        raise SystemExit(f"error: the reference does not exercise everything (halt on Q {by_q}, forced {forced}, "
                         f"exploration {explored}, fresh slots {fresh}); pick another SEED")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-dir", default=str(ROOT / ".ref/official"))
    parser.add_argument("--official-commit", required=True, help="the official repository's commit checked out")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    if not (Path(args.official_dir) / "models").is_dir():
        sys.exit(f"error: no official TRM code under --official-dir {args.official_dir}")
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for mixer in ("attention", "mlp"):
        official, athena = build(args.official_dir, mixer, SIZE, EXPLORATION)
        with torch.no_grad():
            for value in official_weights(official).values():
                value.copy_(value.half().float())
        copy_weights(official, athena)
        batch = reference_batch()
        tensors = run_official(official, athena, batch)
        check_exercised(tensors)
        tensors.update({f"weight.{k}": v.half() for k, v in official_weights(official).items()})
        tensors.update({f"batch.{k}": v for k, v in batch.items()})
        metadata = dict(athena_config=json.dumps(athena_config(mixer, SIZE, EXPLORATION)), seed=str(SEED),
                        steps=str(STEPS), official_commit=args.official_commit, torch=torch.__version__)
        path = args.out_dir / f"official_trm_{mixer}.safetensors"
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        halted = [tensors[f"step{s}.halted"].int().tolist() for s in range(STEPS)]
        print(f"[official_reference] {mixer}: {path.relative_to(ROOT)} ({path.stat().st_size / 1e3:.0f} kB), "
              f"halted per step {halted}")


if __name__ == "__main__":
    main()
