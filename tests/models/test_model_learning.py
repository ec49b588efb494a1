"""Sanity: TRM + AdamAtan2 + SignSGD, trained with deep supervision through the carry, overfits four 4x4 Sudokus."""

import torch

from athena.models import TinyRecursiveModel
from athena.training.optimizers import AdamAtan2, SignSGD

# Four valid 4x4 Sudokus (digits 1..4; rows, columns and 2x2 boxes hold each digit once).
SOLUTIONS = torch.tensor(
    [
        [[1, 2, 3, 4], [3, 4, 1, 2], [2, 1, 4, 3], [4, 3, 2, 1]],
        [[2, 1, 4, 3], [4, 3, 2, 1], [1, 2, 3, 4], [3, 4, 1, 2]],
        [[4, 3, 1, 2], [1, 2, 4, 3], [3, 4, 2, 1], [2, 1, 3, 4]],
        [[3, 1, 2, 4], [2, 4, 3, 1], [1, 3, 4, 2], [4, 2, 1, 3]],
    ]
)


def is_valid_sudoku(grid: torch.Tensor) -> bool:
    groups = list(grid) + list(grid.T) + [grid[r : r + 2, c : c + 2].flatten() for r in (0, 2) for c in (0, 2)]
    return all(sorted(g.tolist()) == [1, 2, 3, 4] for g in groups)


def sudoku_batch() -> dict[str, torch.Tensor]:
    """Token convention: 0 pad, 1 blank, 2..5 = digits 1..4. Half of the cells are blanked out."""
    labels = SOLUTIONS.flatten(1) + 1  # (4, 16)
    g = torch.Generator().manual_seed(0)
    blank = torch.stack([torch.randperm(16, generator=g) < 8 for _ in range(4)])  # (4, 16)
    inputs = torch.where(blank, torch.ones_like(labels), labels)
    return {"inputs": inputs, "labels": labels, "puzzle_identifiers": torch.arange(1, 5)}


def test_solutions_are_valid():
    assert all(is_valid_sudoku(s) for s in SOLUTIONS)


def test_overfits_four_4x4_sudokus():
    # Tiny tensors: one thread is as fast and does not stall when other processes load the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _overfit()
    finally:
        torch.set_num_threads(threads)


def _overfit():
    torch.manual_seed(0)
    model = TinyRecursiveModel(
        vocab_size=6, seq_len=16, num_puzzle_identifiers=5, hidden_size=64, num_heads=4, expansion=2.0,
        num_layers=2, H_cycles=2, L_cycles=2, halt_max_steps=2, halt_exploration_prob=0.1, puzzle_emb_len=1,
    )  # fmt: skip
    dense, sparse = model.param_groups()
    opts = [AdamAtan2(dense, lr=1e-3, weight_decay=0.01), SignSGD(sparse, lr=1e-2, weight_decay=0.01)]
    batch = sudoku_batch()

    def exact_accuracy() -> float:
        model.eval()
        with torch.no_grad():
            carry = model.initial_carry(batch)
            for _ in range(model.halt_max_steps):
                carry, out = model(carry, batch)
        model.train()
        return (out.metrics["exact_accuracy"] / out.metrics["count"]).item()

    assert exact_accuracy() < 1.0
    carry = model.initial_carry(batch)
    solved_at = None
    for step in range(400):
        carry, out = model(carry, batch)
        (out.loss / len(batch["inputs"])).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        if step % 25 == 24 and exact_accuracy() == 1.0:
            solved_at = step
            break
    assert solved_at is not None, "did not overfit 4 puzzles in 400 steps"
