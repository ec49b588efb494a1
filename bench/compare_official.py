"""Same algorithm? Athena's TRM and the official TRM, same weights, same batch, compared step by step (CPU, fp32).

    python bench/compare_official.py --official-dir .ref/official [--mixer mlp|attention] [--steps 6]

Builds the official `TinyRecursiveReasoningModel_ACTV1` + `ACTLossHead` (bench/references.py; its code is read from
--official-dir and never committed) at toy size, copies its weights into Athena's `TinyRecursiveModel` (a
one-to-one name map), and runs both through --steps deep-supervision steps on one batch, each step from the same
RNG seed (halting exploration draws the same numbers in both). Per step it compares the halting decisions, the
logits, the loss (the official's summed lm + 0.5 * halt BCE; Athena's `deep_supervision_loss`) and, after the
backward of that step's loss, every parameter's gradient (the official puzzle embedding's per-batch-row gradient
summed per puzzle id). Prints the largest differences and exits 1 if any exceeds --tol (relative to the largest
magnitude of the official tensor). Float32 throughout, eager: differences are round-off only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOY = dict(seq_len=16, vocab_size=11, batch_size=8, num_puzzle_identifiers=3, hidden_size=64, num_heads=4,
           H_cycles=2, L_cycles=3, puzzle_emb_len=4, halt_max_steps=4)


def athena_name(official: str) -> str:
    """Official state-dict name (under the loss head's `model.inner.`) -> Athena's."""
    name = official.removeprefix("model.inner.")
    return (name.replace("L_level.layers.", "net.layers.").replace(".mlp_t.", ".seq_mlp.")
            .replace(".self_attn.", ".attn.").replace("embed_tokens.embedding_weight", "embed_tokens.weight")
            .replace("puzzle_emb.weights", "puzzle_embedding.weight"))


def athena_config(mixer: str, size: dict, halt_exploration_prob: float = 0.1) -> dict:
    """TinyRecursiveModel's arguments for the official model that `build` makes at `size` (float32 stream)."""
    return dict(vocab_size=size["vocab_size"], seq_len=size["seq_len"],
                num_puzzle_identifiers=size["num_puzzle_identifiers"], hidden_size=size["hidden_size"],
                num_heads=size["num_heads"], expansion=4.0, num_layers=2, H_cycles=size["H_cycles"],
                L_cycles=size["L_cycles"], halt_max_steps=size["halt_max_steps"],
                halt_exploration_prob=halt_exploration_prob, puzzle_emb_len=size["puzzle_emb_len"], mixer=mixer,
                stream_dtype="float32")


def build(official_dir: str, mixer: str, size: dict = TOY, halt_exploration_prob: float = 0.1):
    """The official model (+ loss head) at `size` and Athena's TinyRecursiveModel holding the same weights."""
    from athena.models.trm import TinyRecursiveModel
    from bench import references

    _, official = references.build_official_step(official_dir, "mlp" if mixer == "mlp" else "att", device="cpu",
                                                 compile=False, bf16=False, seed=0,
                                                 halt_exploration_prob=halt_exploration_prob, **size)
    athena = TinyRecursiveModel(**athena_config(mixer, size, halt_exploration_prob))
    # The official zero-initialises its puzzle embedding and Q head (bias -5: nothing halts early); give them values
    # so that the puzzle-embedding gradient and halting on the Q head's say are exercised too.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        official.model.inner.puzzle_emb.weights.normal_(generator=gen)
        official.model.inner.q_head.weight.normal_(std=0.3, generator=gen)
        official.model.inner.q_head.bias.zero_()
    copy_weights(official, athena)
    return official, athena


def official_weights(official) -> dict[str, torch.Tensor]:
    """The official model's weights and buffers under Athena's names (not its per-batch puzzle-embedding scratch)."""
    return {athena_name(k): v for k, v in official.state_dict().items()
            if k.startswith("model.inner.") and "local_" not in k}


def copy_weights(official, athena) -> None:
    """Load the official model's weights into Athena's model; stops if the names or shapes do not map one to one."""
    ours, theirs = athena.state_dict(), official_weights(official)
    if set(theirs) != set(ours):
        raise SystemExit(f"error: weight names do not map one to one: official-only {sorted(set(theirs) - set(ours))}, "
                         f"Athena-only {sorted(set(ours) - set(theirs))}")
    for k, v in theirs.items():
        if v.shape != ours[k].shape:
            raise SystemExit(f"error: {k}: official shape {tuple(v.shape)}, Athena's {tuple(ours[k].shape)}")
    athena.load_state_dict(theirs)


def official_gradients(official, athena) -> dict[str, torch.Tensor | None]:
    """After a backward of the official loss: the gradient of each of Athena's parameters as the official model
    holds it (None where it has none); the puzzle embedding's per-batch-row gradient summed per puzzle id, the
    dense form of Athena's sparse gradient."""
    inner = official.model.inner
    names = {athena_name(k): p for k, p in official.named_parameters() if k.startswith("model.inner.")}
    grads = {}
    for name, p in athena.named_parameters():
        if name == "puzzle_embedding.weight":
            grads[name] = torch.zeros_like(p).index_add_(0, inner.puzzle_emb.local_ids.long(),
                                                         inner.puzzle_emb.local_weights.grad)
        else:
            grads[name] = names[name].grad
    return grads


def zero_official_grads(official) -> None:
    official.zero_grad(set_to_none=True)
    official.model.inner.puzzle_emb.local_weights.grad = None  # a buffer: zero_grad does not reach it


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-dir", default=str(ROOT / ".ref/official"))
    parser.add_argument("--mixer", choices=["mlp", "attention"], default="mlp")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args()
    if not (Path(args.official_dir) / "models").is_dir():
        sys.exit(f"error: no official TRM code under --official-dir {args.official_dir}")
    official, athena = build(args.official_dir, args.mixer)
    official.train()
    athena.train()
    gen = torch.Generator().manual_seed(2)
    B, S, V = TOY["batch_size"], TOY["seq_len"], TOY["vocab_size"]
    labels = torch.randint(2, V, (B, S), generator=gen)
    labels[:, :3] = -100  # given cells carry no loss, as in Sudoku
    batch = {"inputs": torch.randint(1, V, (B, S), generator=gen), "labels": labels,
             "puzzle_identifiers": torch.randint(0, TOY["num_puzzle_identifiers"], (B,), generator=gen)}
    official_batch = {k: v.to(torch.int32) for k, v in batch.items()}
    official_carry = official.initial_carry(official_batch)
    athena_carry = athena.initial_carry(batch)
    worst = 0.0
    for step in range(args.steps):
        torch.manual_seed(100 + step)
        official_carry, loss_o, _, outputs_o, _ = official(carry=official_carry, batch=official_batch,
                                                            return_keys=["logits"])
        torch.manual_seed(100 + step)
        athena_carry, out = athena(athena_carry, batch)
        logits_o = outputs_o["logits"]
        same_halt = torch.equal(official_carry.halted, athena_carry.halted)
        diffs = {"logits": relative(out.logits.detach(), logits_o),
                 "loss": abs(out.loss.item() - loss_o.item()) / abs(loss_o.item())}
        zero_official_grads(official)
        athena.zero_grad(set_to_none=True)
        loss_o.backward()
        out.loss.backward()
        official_grads = official_gradients(official, athena)
        for name, p in athena.named_parameters():
            theirs = official_grads[name]
            ours = p.grad.to_dense() if p.grad is not None and p.grad.is_sparse else p.grad
            if theirs is None and ours is None:
                continue
            if theirs is None or ours is None:
                sys.exit(f"error: step {step}: {name} has a gradient in only one implementation")
            diffs[f"grad {name}"] = relative(ours, theirs)
        top = max(diffs, key=diffs.get)
        worst = max(worst, diffs[top], 0.0 if same_halt else float("inf"))
        print(f"step {step}: halted {athena_carry.halted.int().tolist()} (same: {same_halt}); "
              f"logits {diffs['logits']:.1e}, loss {diffs['loss']:.1e}, largest: {top} {diffs[top]:.1e}")
    verdict = "same function" if worst <= args.tol else "DIFFERENT"
    print(f"[compare_official] {args.mixer}: largest relative difference {worst:.1e} over {args.steps} steps "
          f"(tol {args.tol:.0e}): {verdict}")
    sys.exit(0 if worst <= args.tol else 1)


if __name__ == "__main__":
    main()
