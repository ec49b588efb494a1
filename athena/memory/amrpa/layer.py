"""AMRPA's attention: explicit attention probabilities, a memory of earlier layers' patterns, a gate.

For a targeted layer at depth l, with its own attention pattern A (batch, heads, queries, keys):

    P_1..P_W        the patterns the W earlier layers l-W..l-1 attended with in this forward (oldest first)
    alpha           softmax(selector(hidden) / alpha_temperature) over the W remembered layers, per head and query
    M               sum_w alpha_w * gamma**(l - layer_w) * (P_w + noise in training), kept on the allowed keys and
                    renormalised to a distribution per query (so the decay weights recent layers over old ones)
    s               cosine similarity of A and M per head and query
    g               gate_activation(gate_sensitivity * s + bias_h) * clamp(strength_h, 0, 1)   (strength starts at
                    gate_init_strength, 0 by default: the injected model starts as the original, exactly)
    A'              A + g * (M - A)     (= (1 - g) A + g M: still a distribution; g = 0 gives A exactly)

and the layer's output is dropout(A') @ V. A' is what the layer attended with, so it is what later layers remember:
the memory is recursive. Keys a query may not see (padding, future positions in a causal model) are zero in every
pattern, in M and so in A': a causal model never sees a later token through the memory.

The math runs as an attention function registered with transformers (ATTENTION_NAME) that the model's own attention
modules call in place of SDPA, so the modules, their weights and their call signature stay the model's own. It is the
eager computation (scores, softmax, matmul), which materialises the (batch, heads, queries, keys) probabilities that
SDPA's fused kernels never write: memory O(L^2) per layer instead of O(L), and slower than flash/efficient SDPA.
Only the targeted layers and the earlier layers their windows reach pay it; every other layer keeps its own kernel.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from athena.errors import AthenaError
from athena.memory.amrpa.config import AMRPAConfig

ATTENTION_NAME = "athena_amrpa"


class AMRPAHistoryError(AthenaError, RuntimeError):
    """Attention layers called in an order AMRPA cannot follow (e.g. gradient checkpointing recomputing them)."""


class AMRPAMemory(nn.Module):
    """The learned part of one targeted layer: the selection MLP over its W remembered layers and the per-head gate.

    `distances[w]` is how many layers back the w-th remembered pattern is (oldest first: W, ..., 1)."""

    def __init__(self, hidden_size: int, num_heads: int, window: int, config: AMRPAConfig):
        super().__init__()
        if window < 1:
            raise ValueError(f"an AMRPA memory needs a window of at least 1 layer, got {window}")
        self.num_heads, self.window = num_heads, window
        self.temperature = config.alpha_temperature
        self.noise = config.memory_noise
        self.sensitivity = config.gate_sensitivity
        self.activation = config.gate_activation
        layers: list[nn.Module] = []
        width = hidden_size
        for _ in range(config.alpha_mlp_layers - 1):
            layers += [nn.Linear(width, config.alpha_mlp_hidden), nn.GELU(), nn.Dropout(config.dropout)]
            width = config.alpha_mlp_hidden
        layers.append(nn.Linear(width, num_heads * window))
        self.selector = nn.Sequential(*layers)
        self.gate_bias = nn.Parameter(torch.full((num_heads,), float(config.gate_bias)))
        self.gate_strength = nn.Parameter(torch.full((num_heads,), float(config.gate_init_strength)))
        distances = torch.arange(window, 0, -1, dtype=torch.float32)
        # Not a learned weight and derived from the config: left out of the state dict.
        self.register_buffer("decay", config.memory_decay ** distances, persistent=False)
        self.last_metrics: dict[str, torch.Tensor] = {}
        self.pending_losses: list[tuple[torch.Tensor, torch.Tensor]] = []  # (diversity, gate) of the last training call

    def selection(self, hidden: torch.Tensor) -> torch.Tensor:
        """alpha: (batch, heads, queries, W) softmax weights over the remembered layers from (batch, queries, hidden)
        hidden states."""
        weight = self.selector[0].weight
        logits = self.selector(hidden.to(weight.dtype)).float()  # the memory stays float32 in a bf16 model
        logits = logits.view(*hidden.shape[:2], self.num_heads, self.window).transpose(1, 2)
        return torch.softmax(logits / self.temperature, dim=-1)

    def gate(self, similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g: (batch, heads, queries) in [0, 1] from the cosine similarity of the layer's pattern and the memory, twice:
        for the forward and for the gate regulariser."""
        x = self.sensitivity * similarity + self.gate_bias.float().view(1, -1, 1)
        if self.activation == "sigmoid":
            opened = torch.sigmoid(x)
        elif self.activation == "hard_sigmoid":
            opened = F.hardsigmoid(x)
        else:  # tanh, moved to [0, 1]
            opened = 0.5 * (torch.tanh(x) + 1.0)
        # The strength is clamped to [0, 1] in value but not in gradient (straight through): a head whose strength
        # went below 0 is exactly closed, yet still learns whether opening would help, instead of dying there. The
        # regulariser sees the plain clamp: a closed gate costs nothing, so it is not pushed ever further below 0.
        raw = self.gate_strength.float()
        clamped = raw.clamp(0.0, 1.0)
        strength = raw + (clamped - raw).detach()
        return opened * strength.view(1, -1, 1), opened * clamped.view(1, -1, 1)

    def forward(self, probs: torch.Tensor, history: list[torch.Tensor], allowed: torch.Tensor | None,
                hidden: torch.Tensor) -> torch.Tensor:
        """A' from the layer's own pattern `probs` (float32, (batch, heads, queries, keys)), the W remembered patterns
        (oldest first, same shape; None where nothing is remembered), the keys each query may see (bool,
        broadcastable; None: all) and the hidden state that entered the attention module (batch, queries, hidden)."""
        alpha = self.selection(hidden)
        weights = alpha * self.decay.view(1, 1, 1, -1)  # (batch, heads, queries, W)
        memory = torch.zeros_like(probs)
        for w, pattern in enumerate(history):
            if pattern is None:  # nothing remembered there (TRM: before the supervision step's first applications)
                continue
            if self.training and self.noise > 0:  # fading ink: what is remembered is a little off
                pattern = pattern + self.noise * torch.randn_like(pattern)
            memory = memory + weights[..., w, None] * pattern
        memory = memory.clamp_min(0.0)
        if allowed is not None:
            memory = memory * allowed
        memory = memory / memory.sum(-1, keepdim=True).clamp_min(1e-12)
        similarity = (probs * memory).sum(-1) / (probs.norm(dim=-1) * memory.norm(dim=-1)).clamp_min(1e-12)
        gate, gate_for_loss = self.gate(similarity)
        mixed = probs + gate.unsqueeze(-1) * (memory - probs)
        self._account(alpha, gate, gate_for_loss, similarity, probs, mixed)
        return mixed

    def _account(self, alpha, gate, gate_for_loss, similarity, probs, mixed) -> None:
        """Regularisers (kept for amrpa_aux_loss when gradients are on) and metrics of the last call."""
        # Entropy of the selection normalised by log W: 1 = spread evenly over the remembered layers, 0 = one layer
        # (a window of one layer has nothing to choose: 1, and no loss).
        if self.window > 1:
            diversity = -(alpha * alpha.clamp_min(1e-12).log()).sum(-1) / math.log(self.window)
        else:
            diversity = torch.ones_like(alpha[..., 0])
        if torch.is_grad_enabled() and self.training:
            # Only the last forward's: a caller that never takes them (amrpa_aux_loss) keeps no old graphs alive.
            self.pending_losses = [((1.0 - diversity).mean(), gate_for_loss.mean())]
        with torch.no_grad():
            self.last_metrics = {
                "gate_mean": gate.mean(),
                # Half the L1 distance between the pattern used and the layer's own: how much attention moved.
                "gate_impact": 0.5 * (mixed - probs).abs().sum(-1).mean(),
                "alpha_diversity": diversity.mean(),
                "memory_similarity": similarity.mean(),
                "gate_strength": self.gate_strength.detach().clamp(0.0, 1.0).mean(),
            }


class AMRPAState:
    """What one forward of an injected model remembers: the patterns each depth attended with, the current depth and
    the hidden state that entered its attention module. Shared by the model's attention modules (plain attribute,
    not part of the state dict); reset at the start of every forward of the injected model.

    roles: depth -> 'target' (memory applied), 'record' (pattern kept for a later target); other depths are untouched
    and run the model's own attention kernel (`fallback`)."""

    def __init__(self, num_depths: int, roles: dict[int, str], windows: dict[int, int], fallback: str):
        self.num_depths, self.roles, self.windows, self.fallback = num_depths, roles, windows, fallback
        self.reset()

    def reset(self) -> None:
        self.history: dict[int, torch.Tensor] = {}
        self.depth = -1
        self.hidden: torch.Tensor | None = None

    def enter(self, hidden: torch.Tensor | None) -> None:
        """An attention module is called: the next depth. A model called again without passing through its root
        (a sub-module called directly) starts over at depth 0 after the last depth."""
        if self.depth + 1 >= self.num_depths:
            self.reset()
        self.depth += 1
        self.hidden = hidden if self.roles.get(self.depth) == "target" else None

    def remembered(self, depth: int) -> list[torch.Tensor]:
        window = self.windows[depth]
        missing = [d for d in range(depth - window, depth) if d not in self.history]
        if missing:
            raise AMRPAHistoryError(
                f"AMRPA: layer {depth} needs the attention of layer {missing[0]}, which did not run before it in this "
                "forward (gradient checkpointing and layer skipping are not supported with AMRPA)")
        return [self.history[d] for d in range(depth - window, depth)]


def allowed_keys(attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, causal: bool
                 ) -> torch.Tensor | None:
    """Which keys each query may see, as a bool tensor broadcastable to (batch, heads, queries, keys), from the mask
    the model passes (bool: True = visible, as for SDPA; float: additive, the dtype's minimum = hidden, as for
    eager), or from causality alone when the model passes none (SDPA's is_causal path). None: every key."""
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            return attention_mask
        return attention_mask > torch.finfo(attention_mask.dtype).min / 2
    queries, keys = query.shape[-2], key.shape[-2]
    if not causal or queries == 1:
        return None
    offset = keys - queries  # with a KV cache the queries are the last `queries` positions
    rows = torch.arange(queries, device=query.device).view(-1, 1) + offset
    return (torch.arange(keys, device=query.device).view(1, -1) <= rows).view(1, 1, queries, keys)


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, kv_heads, keys, dim) -> (batch, kv_heads * groups, keys, dim) for grouped-query attention."""
    if groups == 1:
        return states
    batch, heads, keys, dim = states.shape
    return states[:, :, None].expand(batch, heads, groups, keys, dim).reshape(batch, heads * groups, keys, dim)


def amrpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention function transformers calls for an AMRPA module: (batch, heads, queries, dim) inputs ->
    ((batch, queries, heads, dim) output, probabilities). Depths that neither target nor record run the model's
    own implementation unchanged."""
    state: AMRPAState = module._amrpa_state
    depth = state.depth
    role = state.roles.get(depth)
    if role is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        own = ALL_ATTENTION_FUNCTIONS.get_interface(state.fallback, eager_attention)
        return own(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                   **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    # The eager computation, step for step as transformers' eager attention (so a closed gate is bit-exact to it).
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    allowed = allowed_keys(attention_mask, query, key, causal)
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        scores = scores + attention_mask
    elif allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if role == "target":
        memory: AMRPAMemory = module.amrpa[str(depth)]
        probs = memory(probs, state.remembered(depth), allowed, state.hidden)
    state.history[depth] = probs
    used = F.dropout(probs.to(value.dtype), p=dropout, training=module.training)
    output = torch.matmul(used, value).transpose(1, 2).contiguous()
    return output, used


def eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain attention for a model whose own implementation is 'eager' (transformers keeps no registry entry for
    it: each model file has its own copy, which this matches)."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask if attention_mask.dtype != torch.bool else scores.masked_fill(
            ~attention_mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs
