"""Capacity routing of a TRM Block's channel FFN: the horizontal half of issue 18's adaptive computation inside the
recursion (ACT halting, the Q head, is the vertical exit).

With `ffn_capacity` c < 1 every Block owns one router (shared across the recursion, like the block's weights: the
same router scores every H/L application of that block). Per sequence and per application, the round(c x positions)
highest-scoring positions run the SwiGLU and its post-norm residual, h = norm(h + swiglu(h)), on a gathered
(routed, hidden) tensor; the others skip both the FFN and its norm and pass through exactly unchanged; the results
are scattered back. The token mixer still sees every position.

Top-k over the whole puzzle: TRM is not autoregressive (every position is seen at once and nothing is decoded
token by token), so a selection that depends on all positions' scores is fine; no causal threshold is needed here
(athena.adaptive.capacity_router has one for decoders).

Gradients: top-k is hard, so the router learns through athena.adaptive.capacity_router.straight_through_scale
(the FFN output of a routed position is multiplied by 1 forward, and the router's sigmoid score receives
<d loss / d y, y>). Aux losses: ST-MoE's z-loss (and optionally the binary entropy) of the scores, collected from
the applications that run with grad (TRM differentiates only the last H cycle) and added to the model's loss by
the model (`take_aux`). Counts are known on the host: no host syncs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from athena.adaptive.capacity_router import CapacityRouter, round_half_up, straight_through_scale


def routed_count(capacity: float, positions: int) -> int:
    """Positions per sequence that run the FFN: round(capacity x positions), half up."""
    return round_half_up(capacity * positions)


class RoutedFFN(nn.Module):
    """A router and the bookkeeping of its aux losses; `forward(h, mlp, norm)` is the Block's routed FFN step,
    h = norm(h + mlp(h)) on the routed positions only (the Block passes its SwiGLU and its RMSNorm: this module
    imports nothing of layers.py, which builds it)."""

    def __init__(self, hidden_size: int, capacity: float):
        super().__init__()
        if not 0 < capacity <= 1:
            raise ValueError(f"ffn_capacity must be in (0, 1], got {capacity}")
        self.capacity = capacity
        self.router = CapacityRouter(hidden_size)
        self._scores: list[torch.Tensor] = []  # scores of grad-enabled applications since the last take_aux()

    def forward(self, h: torch.Tensor, mlp: nn.Module, norm: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        B, L, D = h.shape  # (batch, seq, hidden)
        k = routed_count(self.capacity, L)
        if k == 0:
            return h
        scores = self.router.scores(h)  # (B, L) float32
        grad = torch.is_grad_enabled() and self.router.proj.weight.requires_grad
        if grad:
            self._scores.append(scores)
        top = scores.topk(k, dim=-1, sorted=False).indices  # (B, k)
        selected = (top + torch.arange(B, device=h.device).unsqueeze(1) * L).flatten()  # (B*k,) flat positions
        flat = h.reshape(B * L, D)
        rows = flat[selected]  # (B*k, D)
        y = mlp(rows)
        if grad:
            y = straight_through_scale(y, torch.sigmoid(scores.flatten()[selected]))
        return flat.index_copy(0, selected, norm(rows + y)).view(B, L, D)

    def realised_capacity(self, positions: int) -> float:
        """The share of a sequence's positions each application routes: round(c x positions) / positions, exactly
        (top-k always fills its k; the tests count the rows reaching the FFN). Known on the host: no counters in
        the forward, which torch.compile would guard on and recompile for."""
        return routed_count(self.capacity, positions) / positions

    def take_aux(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(mean z-loss, mean binary entropy) over the grad-enabled applications since the last call; (None, None)
        if there were none. Forgets them."""
        scores, self._scores = self._scores, []
        if not scores:
            return None, None
        return CapacityRouter.aux_losses(torch.stack(scores))

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}"
