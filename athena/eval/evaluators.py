"""Evaluators: how a model is scored on the test split, chosen by config (`evaluator=`), the same object for the
periodic and final evals of a training run and for evaluate.py.

    report = evaluator.evaluate(EvalContext(model=..., loader=..., device=..., data_dir=...))
    report.metrics()   # {"eval/<name>": value} for metrics.jsonl / W&B
    report.summary()   # the JSON written to eval/<name>.json
    report.headline()  # one line for a person
    report.plots(folder, title)  # {"eval/<plot name>": path of a PNG}

Under torchrun every process evaluates its shard of the split; sums are all-reduced inside, and what must be seen
whole (ARC's votes) is gathered to rank 0 with `EvalContext.gather`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from athena.data.arc import arc_pass_at_k
from athena.eval.plots import plot_accuracy_by_step
from athena.eval.puzzle_eval import PuzzleEvalResult, evaluate_puzzles


@dataclass
class EvalContext:
    model: torch.nn.Module  # with the weights to score (e.g. the EMA applied)
    loader: Iterable  # this process's batches of the test split
    device: torch.device
    data_dir: Path  # the dataset's folder (ARC reads its test outputs there)
    forward: Callable | None = None  # e.g. the compiled model; default: model
    autocast: Callable = nullcontext
    pad_to: int | None = None  # pad the last batch to this many rows: one shape for a compiled model
    progress: bool = False
    gather: Callable[[Any], list | None] = field(default=lambda obj: [obj])  # every process's obj on rank 0, else None


class Evaluator:
    def evaluate(self, ctx: EvalContext):
        raise NotImplementedError


@dataclass
class PuzzleReport:
    result: PuzzleEvalResult

    @property
    def score(self) -> float:
        """The one number a sweep compares runs by: exact accuracy."""
        return self.result.exact_accuracy

    def scope(self) -> str:
        """What was scored, for the headline: sequences and supervision steps."""
        return f"n={self.result.count}, {len(self.result.exact_accuracy_by_step)} steps"

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return self.result.metrics(prefix)

    def summary(self) -> dict:
        return self.result.summary()

    def headline(self) -> str:
        r = self.result
        return (f"exact accuracy {100 * r.exact_accuracy:.2f}%, token accuracy {100 * r.token_accuracy:.2f}%, "
                f"exact at Q-head halt {100 * r.exact_accuracy_at_halt:.2f}% after {r.mean_halt_steps:.1f} steps on "
                "average")

    def plots(self, folder: Path, title: str, stem: str = "accuracy_by_step") -> dict[str, Path]:
        path = plot_accuracy_by_step(self.result.exact_accuracy_by_step, self.result.halt_step_counts,
                                     Path(folder) / f"{stem}.png", title=title)
        return {"eval/accuracy_by_step": path}


class PuzzleEvaluator(Evaluator):
    """Every sequence runs all halt_max_steps supervision steps (as TRM evaluates); exact and token accuracy after
    each step, and where the Q head would have halted (athena.eval.puzzle_eval)."""

    keep_predictions = False

    def evaluate(self, ctx: EvalContext) -> PuzzleReport:
        result = evaluate_puzzles(ctx.forward or ctx.model, ctx.loader, ctx.device,
                                  halt_max_steps=ctx.model.halt_max_steps, autocast=ctx.autocast,
                                  progress=ctx.progress, pad_to=ctx.pad_to, keep_predictions=self.keep_predictions)
        return PuzzleReport(result)


@dataclass
class ARCReport(PuzzleReport):
    arc: dict[str, float] = field(default_factory=dict)  # pass@1, pass@2, num_tasks (rank 0)

    @property
    def score(self) -> float:
        """ARC's own number, pass@2 (exact accuracy on the processes that do not hold the votes)."""
        return self.arc.get("pass@2", self.result.exact_accuracy)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {**super().metrics(prefix), **{f"{prefix}arc_{k}": v for k, v in self.arc.items()}}

    def summary(self) -> dict:
        return {**super().summary(), **self.arc}

    def headline(self) -> str:
        if not self.arc:
            return super().headline()
        return (f"{super().headline()}, ARC pass@1 {100 * self.arc['pass@1']:.2f}%, pass@2 "
                f"{100 * self.arc['pass@2']:.2f}% over {self.arc['num_tasks']} tasks")


class ARCEvaluator(PuzzleEvaluator):
    """The puzzle metrics plus ARC's score: each test input's augmented copies vote (after undoing their
    augmentation) and a task counts the share of its test inputs whose true output is among the top k grids."""

    keep_predictions = True

    def evaluate(self, ctx: EvalContext) -> ARCReport:
        result = super().evaluate(ctx).result
        gathered = ctx.gather(result.predictions)
        arc = {}
        if gathered is not None:  # rank 0 (or the one process): the votes of every shard
            kept = {k: torch.cat([part[k] for part in gathered]) for k in gathered[0]}
            arc = arc_pass_at_k(ctx.data_dir, kept["prediction"].numpy(), q_halt=kept["q_halt_logit"].numpy(),
                                example_indices=kept["index"].numpy())
        return ARCReport(result, arc=arc)
