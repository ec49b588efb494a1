"""What TRM carries between supervision steps (per batch slot), the output of one step, and the carry as plain
tensors for a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass
class SupervisionCarry:
    """State carried between supervision steps; each batch slot is an independent puzzle attempt."""

    z_H: torch.Tensor  # (B, puzzle_emb_len + seq_len, hidden) answer state y, detached
    z_L: torch.Tensor  # (B, puzzle_emb_len + seq_len, hidden) latent state z, detached
    steps: torch.Tensor  # (B,) int32 supervision steps taken by the slot's current puzzle
    halted: torch.Tensor  # (B,) bool: the slot finished last call and takes new data on the next one
    current_data: dict[str, torch.Tensor]  # the batch each slot is working on: inputs, labels, puzzle_identifiers


@dataclass
class SupervisionOutput:
    loss: torch.Tensor  # scalar: SUM over the batch of (lm_loss + halt_loss_weight * q_halt_bce)
    metrics: dict[str, torch.Tensor]  # 0-d float32 SUMS over slots that halted this step (see losses.py)
    logits: torch.Tensor  # (B, seq_len, vocab), puzzle cells only
    q_halt_logits: torch.Tensor  # (B,) float32; > 0 means "halt"


def carry_to_state(carry: SupervisionCarry | None) -> dict[str, Any] | None:
    """The carry as a dict of tensors (and a dict of tensors for current_data), for a weights-only checkpoint."""
    return None if carry is None else {f.name: getattr(carry, f.name) for f in fields(carry)}


def carry_from_state(state: dict[str, Any] | None, device: torch.device) -> SupervisionCarry | None:
    if state is None:
        return None
    moved = {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device))
             for k, v in state.items()}
    return SupervisionCarry(**moved)
