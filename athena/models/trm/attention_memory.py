"""AMRPA memory across TRM's recursion (arch.amrpa_window > 0, mixer=attention).

TRM applies one shared network H_cycles x (L_cycles + 1) times per supervision step. With this option the attention of
layer l of that network, at its t-th application in the step, remembers the patterns layer l attended with at its
applications t-W..t-1 (W = amrpa_window) and mixes them in through athena.memory.amrpa's AMRPAMemory: selection MLP
over the W remembered patterns, decay gamma**distance (distance in applications), fading-ink noise in training, a
similarity gate whose learned strength starts at 0, so the model starts as the one without memory.

Decisions (docs/amrpa.md, "TRM: memory across the recursion"):
- per layer of the shared net, not the unrolled order over all layers: an application of layer l is the same weights at
  the same depth one recursion step later, the TRM analogue of "an earlier layer" (one AMRPAMemory per layer, shared
  by all applications like the block's weights);
- the history restarts at every supervision step (every forward): the carry between steps is detached and slots
  restart on new puzzles at different steps, so patterns of an earlier step belong to another graph, maybe another
  puzzle. The first application of a step has nothing to remember and uses its own pattern; applications t < W see
  only the t patterns there are (the missing older ones count as nothing remembered);
- patterns of the grad-free H cycles are remembered as they are: constants, computed under no_grad;
- what is remembered is the pattern the layer attended with (the mixed one): the memory is recursive, as in AMRPA.

Cost: attention runs eagerly (scores, softmax, matmul) instead of F.scaled_dot_product_attention, to have the
(batch, heads, seq, seq) float32 probabilities: O(seq^2) memory per application instead of SDPA's fused O(seq), W of
them kept per layer, plus the memory's own tensors saved for backward in the differentiated cycle.
"""

from __future__ import annotations

import torch
from torch import nn

from athena.memory.amrpa.config import AMRPAConfig
from athena.memory.amrpa.layer import AMRPAMemory

METRICS = ("gate_mean", "gate_impact", "alpha_diversity", "memory_similarity", "gate_strength")


def amrpa_config_of(config) -> AMRPAConfig:
    """The AMRPAConfig of a TRMConfig's amrpa_* knobs; every other knob keeps AMRPAConfig's default."""
    return AMRPAConfig(max_window_size=config.amrpa_window, memory_decay=config.amrpa_decay,
                       gate_init_strength=config.amrpa_gate_init_strength,
                       alpha_mlp_hidden=config.amrpa_alpha_mlp_hidden, adaptive_window=False)


class RecursionMemory(nn.Module):
    """The AMRPA memories of the shared network's layers (`amrpa`, by layer index: the name athena.memory.amrpa's
    get_amrpa_metrics and reset_amrpa_history look for) and the patterns of the current supervision step."""

    def __init__(self, net: nn.Module, config):
        super().__init__()
        self._amrpa_config = amrpa_config_of(config)
        self.window = config.amrpa_window
        self.amrpa = nn.ModuleDict({str(i): AMRPAMemory(config.hidden_size, config.num_heads, self.window,
                                                        self._amrpa_config) for i in range(len(net.layers))})
        for i, layer in enumerate(net.layers):
            # A plain attribute, not a submodule: the memory's weights live here once, in `amrpa`.
            layer.attn.memory = _LayerHook(self, i)
        self.trace: list[dict] | None = None  # a list: every application's tensors are appended (tests)
        self.start()

    def start(self) -> None:
        """A new supervision step: nothing remembered, no metrics, no regularisers yet."""
        self.history: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(self.amrpa))}  # the last W, per layer
        self.applications = [0] * len(self.amrpa)  # per layer, in this step
        self.step_metrics: dict[int, list[dict[str, torch.Tensor]]] = {i: [] for i in range(len(self.amrpa))}
        for memory in self.amrpa.values():
            memory.pending_losses = []

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor
               ) -> torch.Tensor:
        """Attention of `layer` with q, k, v (batch, heads, seq, head_dim) and the hidden state that entered it ->
        (batch, heads, seq, head_dim), as F.scaled_dot_product_attention computes it, through explicit probabilities
        that the memory may mix with the layer's last W patterns."""
        scores = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        own = torch.softmax(scores, dim=-1, dtype=torch.float32)
        history = self.history[layer]
        used = own
        if history:
            memory: AMRPAMemory = self.amrpa[str(layer)]
            remembered = [None] * (self.window - len(history)) + history
            before = memory.pending_losses
            used = memory(own, remembered, None, hidden)
            if memory.pending_losses is not before:  # a training call with gradients: keep every application's
                memory.pending_losses = before + memory.pending_losses
            self.step_metrics[layer].append(memory.last_metrics)
        history.append(used)
        del history[:-self.window]  # older patterns are never read again: not kept alive
        if self.trace is not None:
            self.trace.append({"layer": layer, "t": self.applications[layer], "hidden": hidden.detach(),
                               "own": own.detach(), "used": used.detach()})
        self.applications[layer] += 1
        return torch.matmul(used.to(v.dtype), v)

    def finish(self, loss: torch.Tensor, batch_size: int) -> torch.Tensor:
        """After a supervision step: each memory's metrics become the mean over its applications in the step
        (get_amrpa_metrics), and the regularisers of the differentiated applications join `loss` (a SUM over the
        batch: the mean regulariser counts once per sample). The patterns are dropped."""
        for i, memory in self.amrpa.items():
            calls = self.step_metrics[int(i)]
            if calls:
                memory.last_metrics = {name: torch.stack([c[name] for c in calls]).mean() for name in METRICS}
        pending = [item for memory in self.amrpa.values() for item in memory.pending_losses]
        self.start()
        if not pending:
            return loss
        config = self._amrpa_config
        diversity = torch.stack([d for d, _ in pending]).mean()
        gate = torch.stack([g for _, g in pending]).mean()
        return loss + batch_size * (config.diversity_weight * diversity + config.gate_reg_weight * gate)


class _LayerHook:
    """What Attention.memory holds: layer `index`'s attention through the recursion memory."""

    def __init__(self, owner: RecursionMemory, index: int):
        self.owner, self.index = owner, index

    def __call__(self, q, k, v, hidden):
        return self.owner.attend(self.index, q, k, v, hidden)
