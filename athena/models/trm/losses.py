"""Losses and metrics for one deep-supervision step of TRM.

Token loss: stablemax cross-entropy (default; from "Grokking at the edge of numerical stability") or softmax
cross-entropy. Halting loss: BCE of the halt logit against "this sequence is exactly right".
"""

import torch
import torch.nn.functional as F

from athena.models.trm.config import LOSS_TYPES

IGNORE_INDEX = -100


def log_stablemax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log of stablemax: s(x) = x + 1 for x >= 0, 1 / (1 - x) for x < 0;  p_i = s(x_i) / sum_j s(x_j).

    Both branches are computed on clamped inputs so the branch NOT taken is finite and cannot poison the
    gradient (torch.where back-propagates 0 * inf = nan otherwise).
    """
    log_s = torch.where(logits >= 0, torch.log1p(logits.clamp(min=0)), -torch.log1p(-logits.clamp(max=0)))
    return log_s - torch.logsumexp(log_s, dim=dim, keepdim=True)


def stablemax_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Per-token loss in float64 (stablemax is sensitive to rounding); 0 where labels == ignore_index.

    logits: (..., vocab); labels: (...) int. Returns (...) float64.
    """
    valid = labels != ignore_index
    logp = log_stablemax(logits.to(torch.float64), dim=-1)  # (..., vocab)
    safe_labels = torch.where(valid, labels, 0).long()
    picked = logp.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # (...)
    return torch.where(valid, -picked, 0.0)


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-token softmax cross-entropy in float32; 0 where labels == ignore_index. Returns (...) float32."""
    flat_logits = logits.float().reshape(-1, logits.shape[-1])  # (N, vocab)
    flat = F.cross_entropy(flat_logits, labels.long().reshape(-1), ignore_index=ignore_index, reduction="none")
    return flat.view(labels.shape)


def deep_supervision_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    q_halt_logits: torch.Tensor,
    halted: torch.Tensor,
    steps: torch.Tensor,
    loss_type: str = "stablemax",
    halt_loss_weight: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one supervision step, summed over the batch, and metrics summed over the slots that halted.

    logits: (B, seq, vocab); labels: (B, seq) with ignore_index = -100; q_halt_logits: (B,) float32;
    halted: (B,) bool (after this step); steps: (B,) int (after this step).
    Returns (loss: scalar float32, metrics: dict of 0-d float32 tensors). No host syncs.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    token_loss_fn = stablemax_cross_entropy if loss_type == "stablemax" else softmax_cross_entropy
    valid = labels != IGNORE_INDEX  # (B, seq)
    num_valid = valid.sum(-1)  # (B,)
    divisor = num_valid.clamp(min=1)  # a sequence without labels contributes 0, not nan

    with torch.no_grad():
        correct = valid & (logits.argmax(-1) == labels)  # (B, seq)
        seq_exact = correct.sum(-1) == num_valid  # (B,)

    # Each sequence weighs the same however many labelled cells it has.
    lm_loss = token_loss_fn(logits, labels).sum(-1) / divisor  # (B,)
    q_halt_loss = F.binary_cross_entropy_with_logits(q_halt_logits.float(), seq_exact.float(), reduction="none")  # (B,)
    loss = (lm_loss.float() + halt_loss_weight * q_halt_loss).sum()

    with torch.no_grad():
        # Only slots that finished this step count (and only if they had labels): one entry per solved attempt.
        done = halted & (num_valid > 0)  # (B,)

        def halted_sum(per_seq: torch.Tensor) -> torch.Tensor:
            return torch.where(done, per_seq.float(), 0.0).sum()  # where, not *, so a nan elsewhere can't leak in

        metrics = {
            "count": halted_sum(torch.ones_like(q_halt_loss)),
            "accuracy": halted_sum(correct.sum(-1) / divisor),
            "exact_accuracy": halted_sum(seq_exact),
            "q_halt_accuracy": halted_sum((q_halt_logits > 0) == seq_exact),
            "steps": halted_sum(steps),
            "lm_loss": halted_sum(lm_loss),
            "q_halt_loss": halted_sum(q_halt_loss),
        }
    return loss, metrics
