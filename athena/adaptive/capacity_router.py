"""CapacityRouter: which of a layer's active tokens run its FFN.

One linear unit scores each token's residual stream (RMS-normalised, no weight): s. Two selection modes:
- topk: per sequence, exactly round(c x active tokens of that sequence) tokens with the highest scores. Not causal
  (a token's selection depends on later tokens' scores): training and prefill scoring.
- causal: a token runs the FFN when s > threshold, a per-layer buffer that tracks, as an exponential moving average
  during top-k forwards, the score at the top-k boundary (or is set by `calibrate`). It never looks at other tokens,
  so a prefix is routed the same whatever follows: what decoding with a KV cache needs.

Top-k is hard, so the router learns through a straight-through scale: the FFN output y of a selected token is
multiplied by 1 in the forward while d loss / d s = <d loss / d y, y> * sigmoid'(s) in the backward (does running
this token's FFN help the loss?). Aux losses: ST-MoE's z-loss for the two-way choice {run, skip} with logits (s, 0),
i.e. softplus(s)^2, and the binary entropy of sigmoid(s) (penalised: sharp scores that a threshold reproduces).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def round_half_up(x: float) -> int:
    return int(x + 0.5)


class CapacityRouter(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.proj.weight, std=hidden_size ** -0.5)
        nn.init.zeros_(self.proj.bias)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_seen", torch.zeros((), dtype=torch.bool))

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (...) float32 routing scores."""
        normed = F.rms_norm(hidden.float(), (hidden.shape[-1],))
        return self.proj(normed.to(self.proj.weight.dtype)).squeeze(-1).float()

    @torch.no_grad()
    def track_threshold(self, boundary: torch.Tensor, momentum: float) -> None:
        """EMA of the top-k boundary score (a device tensor: no host sync)."""
        new = torch.where(self.threshold_seen, momentum * self.threshold + (1 - momentum) * boundary, boundary)
        self.threshold.copy_(new)
        self.threshold_seen.fill_(True)

    @torch.no_grad()
    def calibrate(self, scores: torch.Tensor, capacity: float) -> None:
        """Set the causal threshold so that a share `capacity` of these scores passes it."""
        self.threshold.fill_(torch.quantile(scores.float().flatten(), 1 - capacity).item())
        self.threshold_seen.fill_(True)

    @staticmethod
    def aux_losses(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z-loss, mean binary entropy) over these scores."""
        z_loss = F.softplus(scores).square().mean()
        p = torch.sigmoid(scores)
        entropy = -(p * F.logsigmoid(scores) + (1 - p) * F.logsigmoid(-scores)).mean()
        return z_loss, entropy


class _ScaleStraightThrough(torch.autograd.Function):
    """y in the forward; the gradient of y * gate at gate = 1 for the gate (one value per row)."""

    @staticmethod
    def forward(ctx, y, gate):
        ctx.save_for_backward(y, gate)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        y, gate = ctx.saved_tensors
        return grad, (grad.float() * y.float()).sum(-1).to(gate.dtype)


def straight_through_scale(y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """(n, hidden) FFN outputs, unchanged; `gate` (n,) receives d loss / d (scale of y)."""
    return _ScaleStraightThrough.apply(y, gate)
