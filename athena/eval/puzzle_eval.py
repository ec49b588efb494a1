"""Evaluate a TRM on a puzzle split: every sequence runs all `halt_max_steps` supervision steps
(as TRM evaluates), and we also record where the Q head would have halted.

Reported (fractions over sequences):
  exact_accuracy          every labelled cell right after the last step
  token_accuracy          labelled cells right after the last step
  exact_accuracy_at_halt  exact accuracy of the answer at the step the Q head first says halt
  mean_halt_steps         mean of that step (the compute the model would actually use)
  exact_accuracy_by_step  exact accuracy after step 1..N
  halt_step_counts        how many sequences first halt at step 1..N
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm.auto import tqdm


@dataclass
class PuzzleEvalResult:
    count: int
    exact_accuracy: float
    token_accuracy: float
    exact_accuracy_at_halt: float
    mean_halt_steps: float
    exact_accuracy_by_step: list[float]
    halt_step_counts: list[int]
    predictions: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {
            f"{prefix}exact_accuracy": self.exact_accuracy,
            f"{prefix}token_accuracy": self.token_accuracy,
            f"{prefix}exact_accuracy_at_halt": self.exact_accuracy_at_halt,
            f"{prefix}mean_halt_steps": self.mean_halt_steps,
            f"{prefix}count": self.count,
        }

    def summary(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "predictions"}


def pad_rows(batch: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """Pad a batch to `rows` sequences: unlabelled (-100) padding, inputs and puzzle ids 0 (pad token, blank id)."""
    n = batch["labels"].shape[0]
    if n >= rows:
        return batch
    return {k: torch.cat([v, v.new_full((rows - n, *v.shape[1:]), -100 if k == "labels" else 0)])
            for k, v in batch.items()}


@torch.no_grad()
def evaluate_puzzles(model, loader, device: torch.device, *, halt_max_steps: int, autocast=nullcontext,
                     progress: bool = False, keep_predictions: bool = False, pad_to: int | None = None,
                     description: str = "eval") -> PuzzleEvalResult:
    """Run `model` (already in eval mode, e.g. with EMA weights applied) over `loader`.

    pad_to: pad smaller batches (the last one) to this many sequences, which count nowhere. A compiled model
    then sees one shape: without it the last batch costs a second, dynamic-shape compilation (H100, TRM-MLP
    Sudoku: the first eval of a training run took 94 s without padding, 41 s with it, measured while a
    misplaced decorator still ran evals with autograd on)."""
    was_training = model.training
    model.eval()
    steps = halt_max_steps
    # Sums kept on the device: one transfer at the end, no per-batch host syncs.
    exact_by_step = torch.zeros(steps, dtype=torch.float64, device=device)
    halt_counts = torch.zeros(steps, dtype=torch.float64, device=device)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # count, token_acc, exact_at_halt, halt_steps
    kept: dict[str, list[torch.Tensor]] = {"index": [], "prediction": [], "q_halt_logit": []}

    for batch in tqdm(loader, desc=description, disable=not progress, leave=False):
        index = batch.pop("index", None)
        batch.pop("position", None)
        rows = batch["labels"].shape[0]
        if pad_to is not None:
            batch = pad_rows(batch, pad_to)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        labels = batch["labels"]
        mask = labels != -100
        real = torch.arange(labels.shape[0], device=device) < rows  # padding rows count nowhere
        carry = model.initial_carry(batch)
        halted_at = torch.full((labels.shape[0],), steps - 1, device=device)
        first_halt_seen = torch.zeros(labels.shape[0], dtype=torch.bool, device=device)
        exact_at_halt = torch.zeros(labels.shape[0], dtype=torch.bool, device=device)
        for step in range(steps):
            with autocast():
                carry, out = model(carry, batch)
            prediction = out.logits.argmax(-1)
            correct = (prediction == labels) & mask
            exact = (correct.sum(-1) == mask.sum(-1)) & real
            exact_by_step[step] += exact.sum()
            says_halt = (out.q_halt_logits > 0) | (step == steps - 1)
            newly = says_halt & ~first_halt_seen
            halted_at = torch.where(newly, step, halted_at)
            exact_at_halt = torch.where(newly, exact, exact_at_halt)
            first_halt_seen |= says_halt
        token_acc = correct.sum(-1) / mask.sum(-1).clamp_min(1)
        totals += torch.stack([
            torch.tensor(float(rows), device=device, dtype=torch.float64),
            token_acc.double().sum(), exact_at_halt.double().sum(), ((halted_at + 1) * real).double().sum(),
        ])
        halt_counts += torch.bincount(halted_at, weights=real.double(), minlength=steps)
        if keep_predictions:
            kept["prediction"].append(prediction[:rows].cpu())
            kept["q_halt_logit"].append(out.q_halt_logits[:rows].float().cpu())
            if index is not None:
                kept["index"].append(torch.as_tensor(index))

    if dist.is_available() and dist.is_initialized():
        for t in (exact_by_step, halt_counts, totals):
            dist.all_reduce(t)
    model.train(was_training)
    count = max(1.0, totals[0].item())
    by_step = (exact_by_step / count).tolist()
    return PuzzleEvalResult(
        count=int(totals[0].item()),
        exact_accuracy=by_step[-1],
        token_accuracy=totals[1].item() / count,
        exact_accuracy_at_halt=totals[2].item() / count,
        mean_halt_steps=totals[3].item() / count,
        exact_accuracy_by_step=by_step,
        halt_step_counts=[int(c) for c in halt_counts.tolist()],
        predictions={k: torch.cat(v) for k, v in kept.items() if v},
    )
