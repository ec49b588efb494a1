"""Routed LoRA experts: a router sends each token to top_k of num_experts low-rank experts.

    out = base(x) + sum_{e in top-k(x)} gate_e(x) * B_e(A_e(x)) * expert_scaling

Experts are batched, never looped over in Python: all experts' A are one (E*r, in) matrix and all B one
(out, E*r) matrix. x @ A_all gives every expert's r-slice at once; each slice is multiplied by its routing
weight (0 for experts outside the token's top-k), then one matmul with B_all sums the chosen experts.
Zeroed slices mean unselected experts get exactly zero gradient, as if they had not run. Every expert B starts
at zero, so a fresh adapter equals the base exactly.

The router loss (load balancing + z-loss) is deferred: the forward only records (logits, top-k ids), and
router_loss computes it for every call of every layer at once when the trainer asks (adapter_aux_loss).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from athena.adapters.parts.lora import add_low_rank


class RoutedExperts:
    name = "experts"
    switch = "use_moe"
    tensors = ("router", "expert_A", "expert_B")
    mergeable = False  # the delta depends on the input through the routing

    @staticmethod
    def build(layer: nn.Module, **factory_kwargs) -> None:
        E, r = layer.num_experts, layer.expert_rank
        layer.expert_scaling = layer.alpha / (math.sqrt(r) if layer.use_rslora else r)
        layer.router = nn.Linear(layer.in_features, E, bias=False, **factory_kwargs)
        nn.init.normal_(layer.router.weight, std=0.02)  # small: near-uniform routing, ties broken at random
        layer.expert_A = nn.Parameter(torch.empty(E * r, layer.in_features, **factory_kwargs))  # expert e: rows e*r:(e+1)*r
        layer.expert_B = nn.Parameter(torch.zeros(layer.out_features, E * r, **factory_kwargs))
        for e in range(E):  # each expert initialised like an independent LoRA A
            nn.init.kaiming_uniform_(layer.expert_A.data[e * r : (e + 1) * r], a=math.sqrt(5))

    @staticmethod
    def weight_dtype(layer: nn.Module) -> torch.dtype:
        return layer.expert_A.dtype

    @staticmethod
    def route(layer: nn.Module, x2: torch.Tensor, dtype: torch.dtype = torch.float32
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x2 (N, in) -> gates (N, E) in `dtype` (zero outside each token's top-k), router logits (N, E) in the
        compute dtype (router_loss takes them to float32), top-k ids (N, k)."""
        logits = F.linear(x2, layer.router.weight)
        if layer.top_k > 1:
            # The softmax renormalised over the chosen experts IS the softmax of their logits: no full softmax.
            # Softmax accumulates in float32 whatever the input dtype, so the logits are not cast per call.
            top_logits, top_i = logits.topk(layer.top_k, dim=-1)
            top_p = top_logits.softmax(-1)
        else:  # k=1 keeps the raw probability (Switch), so the router still gets a gradient from the task loss
            top_p, top_i = logits.softmax(-1, dtype=torch.float32).topk(1, dim=-1)
        gates = logits.new_zeros(logits.shape, dtype=dtype).scatter_(
            1, top_i, top_p if top_p.dtype == dtype else top_p.to(dtype))
        return gates, logits, top_i

    @staticmethod
    def add_delta(layer: nn.Module, xa: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + the gated sum of the chosen experts' B_e A_e x: a fixed handful of kernels, however many experts
        (router, top-k, softmax, gates, one down- and one up-projection)."""
        E, r = layer.num_experts, layer.expert_rank
        h = F.linear(xa, layer.expert_A)  # (N, E*r): every expert's down-projection at once
        gates, logits, top_i = RoutedExperts.route(layer, xa, h.dtype)
        if torch.is_grad_enabled():
            RoutedExperts.record_call(layer, logits, top_i)
        # Unselected experts -> exactly zero (value and gradient).
        h = (h.view(-1, E, r) * gates.unsqueeze(-1)).view(-1, E * r)
        up = layer.expert_B if layer.expert_B.dtype == out.dtype else layer.expert_B.to(out.dtype)
        if h.dtype != out.dtype:
            h = h.to(out.dtype)
        return add_low_rank(out, h, up, layer.expert_scaling)  # + sum over the chosen experts of B_e (gated h_e)

    @staticmethod
    def record_call(layer: nn.Module, logits: torch.Tensor, top_i: torch.Tensor) -> None:
        # Only remember the call: the router loss is computed when popped, for every call of every layer of the
        # same shape at once (router_loss), not as ~10 small kernels per layer per call. The logits are saved
        # for backward anyway, so keeping them costs no memory.
        # Activation checkpointing re-runs this forward during backward: that call must not count a second time.
        if not _in_backward():
            layer._router_calls.append((logits, top_i))
            layer._last_top_i = top_i

    @staticmethod
    def last_load(layer: nn.Module) -> torch.Tensor | None:
        """(E,) fraction of routed slots per expert in the last grad-enabled forward, for logging."""
        if layer._last_top_i is None:
            return None
        top_i = layer._last_top_i
        counts = torch.zeros(layer.num_experts, device=top_i.device).scatter_add_(
            0, top_i.reshape(-1), torch.ones(top_i.numel(), device=top_i.device))
        return counts / top_i.numel()

    @staticmethod
    def describe(layer: nn.Module) -> str:
        return f"experts({layer.num_experts}, top_k={layer.top_k}, rank={layer.expert_rank})"


def router_loss(calls: list[tuple[torch.Tensor, torch.Tensor]], aux_weight: float, z_weight: float
                ) -> torch.Tensor | None:
    """Sum over router calls (logits (N, E), top-k ids (N, k)) of
        aux_weight * E * sum_e (fraction of the N*k routed slots that went to e) * (mean router prob of e)
      + z_weight * mean_n logsumexp(logits_n)^2
    (Switch load balancing, 1 when uniform; ST-MoE z-loss). Calls of the same shape are stacked and done in one
    go, so the cost does not grow with the number of layers. Slots are counted by scatter, not bincount, which
    would wait for the GPU."""
    groups: dict[tuple, list] = {}
    for logits, top_i in calls:
        groups.setdefault((tuple(logits.shape), top_i.shape[1], logits.device, logits.dtype), []).append((logits, top_i))
    total = None
    for ((n, e), k, _, _), group in groups.items():
        logits = torch.stack([c[0] for c in group]) if len(group) > 1 else group[0][0][None]  # (C, N, E)
        logits = logits.float()  # one cast for the whole group (a no-op when they are float32 already)
        top_i = torch.stack([c[1] for c in group]) if len(group) > 1 else group[0][1][None]  # (C, N, k)
        counts = torch.zeros_like(logits).scatter_(2, top_i, 1.0).sum(1)  # (C, E) slots per expert
        balance = (counts * logits.softmax(-1).sum(1)).sum() * (aux_weight * e / (n * n * k))
        z_loss = torch.logsumexp(logits, dim=-1).square().sum() * (z_weight / n)
        term = balance + z_loss
        total = term if total is None else total + term
    return total


def _in_backward() -> bool:
    """True while autograd runs backward (e.g. activation checkpointing recomputing the forward): that
    recomputation must not add the router loss a second time.

    Under torch.compile the check is skipped: it returns a Python int that Dynamo cannot trace (a graph break
    at every expert layer), and a compiled graph recomputes checkpointed regions inside its own backward
    without re-running this Python."""
    if torch.compiler.is_compiling():
        return False
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # older torch: no way to tell; counting twice is the lesser evil
        return False
