"""Perplexity of a causal LM on a held-out split (evaluator=perplexity).

Token level, over Athena's on-disk text format: each batch holds `inputs` (B, S) token ids and `labels` (B, S), the
same ids (a packed split) or -100 where nothing is scored (prompts and padding of a fine-tuning split). The model
predicts labels[:, t+1] from inputs[:, :t+1]; every labelled next token counts once:

    mean_loss  = sum of -log p(token) / tokens      (nats per token)
    perplexity = exp(mean_loss)

The log-probabilities come from a float32 log-softmax (cross_entropy). torchmetrics' Perplexity normalises with a
softmax and then takes the log, which underflows to -inf for a token below ~1e-38 and keeps bf16's 3 digits when
the logits are bf16, and it holds a second (tokens, vocab) tensor: tests use it as the independent reference.
Under torchrun every process scores its shard and the float64 sums are all-reduced.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from athena.eval.evaluators import EvalContext, Evaluator
from athena.eval.puzzle_eval import pad_rows


@dataclass
class PerplexityReport:
    nll_sum: float  # nats, over every scored token
    tokens: int
    sequences: int

    @property
    def mean_loss(self) -> float:
        return self.nll_sum / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_loss) if self.tokens else float("nan")

    @property
    def score(self) -> float:
        """The one number a sweep compares runs by: perplexity (lower is better)."""
        return self.perplexity

    def scope(self) -> str:
        return f"n={self.sequences}, {self.tokens:,} tokens"

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {f"{prefix}perplexity": self.perplexity, f"{prefix}loss": self.mean_loss,
                f"{prefix}tokens": float(self.tokens), f"{prefix}count": float(self.sequences)}

    def summary(self) -> dict:
        return {"perplexity": self.perplexity, "mean_loss": self.mean_loss, "tokens": self.tokens,
                "sequences": self.sequences, "nll_sum": self.nll_sum}

    def headline(self) -> str:
        return f"perplexity {self.perplexity:.2f} (mean loss {self.mean_loss:.4f} nats/token)"

    def plots(self, folder, title: str, stem: str = "perplexity") -> dict:
        return {}  # one number per eval: the training curve (metrics.jsonl) plots it over steps


class PerplexityEvaluator(Evaluator):
    """Token-level perplexity and mean loss of `model(input_ids=inputs).logits` on the split ctx.loader yields.

    rows_per_forward: split each batch into forwards of at most this many rows, so an eval batch sized for puzzles
    does not hold (rows, seq_len, vocab) logits at once (8 x 2048 x 49,152 bf16 logits are 1.6 GB); None: whole."""

    def __init__(self, rows_per_forward: int | None = 8):
        if rows_per_forward is not None and rows_per_forward < 1:
            raise ValueError(f"rows_per_forward must be >= 1 or null, got {rows_per_forward}")
        self.rows_per_forward = rows_per_forward

    @torch.no_grad()
    def evaluate(self, ctx: EvalContext) -> PerplexityReport:
        forward = ctx.forward or ctx.model
        sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # nll, tokens, sequences: no per-batch syncs
        with evaluation_mode(ctx.model):
            for batch in tqdm(ctx.loader, desc="perplexity", disable=not ctx.progress, leave=False):
                rows = batch["labels"].shape[0]
                if ctx.pad_to is not None:  # padding rows are labelled -100: they count nowhere
                    batch = pad_rows({"inputs": batch["inputs"], "labels": batch["labels"]}, ctx.pad_to)
                inputs = batch["inputs"].to(ctx.device, non_blocking=True)
                labels = batch["labels"].to(ctx.device, non_blocking=True)
                step = self.rows_per_forward or inputs.shape[0]
                for start in range(0, inputs.shape[0], step):
                    nll, tokens = next_token_nll(forward, inputs[start:start + step], labels[start:start + step],
                                                 ctx.autocast)
                    sums[0] += nll
                    sums[1] += tokens
                sums[2] += rows
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        nll, tokens, sequences = sums.tolist()
        return PerplexityReport(nll_sum=nll, tokens=int(tokens), sequences=int(sequences))


@contextmanager
def evaluation_mode(model: torch.nn.Module):
    """The model in eval mode inside; afterwards every submodule back in the mode it had (a periodic eval runs in
    the middle of training, where some modules may be frozen in eval mode on purpose)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def next_token_nll(forward, inputs: torch.Tensor, labels: torch.Tensor, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p(labels[:, t+1] | inputs[:, :t+1]) over labelled positions, how many), float64 on the device."""
    with autocast():
        logits = forward(input_ids=inputs).logits  # (B, S, vocab)
    targets = labels[:, 1:]
    # float32 one row at a time: a bf16 log-softmax keeps 3 digits, and a float32 copy of every row's logits at once
    # would double the largest tensor of the eval
    nll = sum(F.cross_entropy(logits[row, :-1].float(), targets[row], ignore_index=-100, reduction="sum").double()
              for row in range(logits.shape[0]))
    return nll, (targets != -100).sum().double()
