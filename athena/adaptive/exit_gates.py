"""ExitGate: a per-token decision to stop computing at this depth.

The gate reads the token's residual stream (RMS-normalised, no weight) through one linear unit: logit l.
- eval: exit when l > threshold (a buffer, 0 = probability 1/2; `calibrate` can set it for a target exit rate). The
  decision reads only the token's own state, so it is causal: a prefix exits the same whatever follows.
- training: Gumbel-softmax straight-through over {exit, stay} (two-way, so the Gumbel difference is logistic noise
  g): forward is the hard decision l + tau_forward * g > 0 (tau_forward scales exploration; 0 = deterministic),
  backward flows through sigmoid((l + tau_forward * g) / tau_backward). The two temperatures are separate so the
  forward can explore little while the gradient stays smooth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from athena.adaptive.config import ExitConfig


class ExitGate(nn.Module):
    def __init__(self, hidden_size: int, bias_init: float = ExitConfig().gate_bias_init):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.proj.weight, std=hidden_size ** -0.5 * 0.1)
        nn.init.constant_(self.proj.bias, bias_init)
        self.register_buffer("threshold", torch.zeros(()))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (...) exit logits, float32."""
        normed = F.rms_norm(hidden.float(), (hidden.shape[-1],))
        return self.proj(normed.to(self.proj.weight.dtype)).squeeze(-1).float()

    def decide(self, hidden: torch.Tensor, tau_forward: float, tau_backward: float
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(exit_hard bool, stay_soft float or None in eval, logits). stay_soft carries the gradient (training)."""
        logits = self.logits(hidden)
        if not self.training:
            return logits > self.threshold, None, logits
        uniform = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
        noisy = logits + tau_forward * (uniform.log() - (-uniform).log1p())  # logistic = Gumbel difference
        exit_soft = torch.sigmoid(noisy / tau_backward)
        return noisy > 0, 1 - exit_soft, logits

    @torch.no_grad()
    def calibrate(self, logits: torch.Tensor, exit_rate: float) -> None:
        """Set the eval threshold so that a share `exit_rate` of these logits exits."""
        self.threshold.fill_(torch.quantile(logits.float().flatten(), 1 - exit_rate).item() if exit_rate > 0
                             else float("inf"))
