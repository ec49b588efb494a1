"""PolyAdapter: one wrapper around a linear layer holding IA3, LoRA and a routed mixture of LoRA experts.

    out = base(x) * ia3            (IA3: scales the OUTPUT features of the wrapped layer; init ones)
        + lora_B(lora_A(drop(x))) * scaling
        + sum_{e in top-k(x)} gate_e(x) * B_e(A_e(drop(x))) * expert_scaling

Every part is a plain attribute you can flip (`layer.use_lora = False`); all off is exactly `base(x)`.
LoRA B and every expert B start at zero, IA3 at one, so a fresh adapter equals the base exactly.

Experts are batched, never looped over in Python: all experts' A are one (E*r, in) matrix and all B one
(out, E*r) matrix. x @ A_all gives every expert's r-slice at once; each slice is multiplied by its routing
weight (0 for experts outside the token's top-k), then one matmul with B_all sums the chosen experts.
Zeroed slices mean unselected experts get exactly zero gradient, as if they had not run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from athena.adapters.config import AdapterConfigError


def base_dims(layer: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a supported linear layer.

    fan_in_fan_out: the weight is stored (in, out), as in HF GPT-2's Conv1D, instead of torch's (out, in).
    """
    from athena.adapters.quantize import Int8Linear

    name = type(layer).__name__
    if isinstance(layer, (nn.Linear, Int8Linear)) or _is_athena_linear(layer):
        return layer.in_features, layer.out_features, False
    if name == "Conv1D" and hasattr(layer, "nf"):  # transformers.pytorch_utils.Conv1D: weight (in, out)
        return layer.weight.shape[0], layer.weight.shape[1], True
    raise TypeError(f"cannot wrap {name}: supported are nn.Linear, athena Linear and transformers Conv1D")


def _is_athena_linear(layer: nn.Module) -> bool:
    from athena.models.trm.layers import Linear

    return isinstance(layer, Linear)


class PolyAdapter(nn.Module):
    def __init__(
        self,
        base_layer: nn.Module,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_lora: bool = True,
        use_ia3: bool = False,
        use_moe: bool | None = None,
        num_experts: int | None = None,
        top_k: int | None = None,
        expert_rank: int | None = None,
        use_rslora: bool = False,
        router_aux_weight: float = 0.01,
        router_z_weight: float = 0.001,
        ia3_recompute: bool = False,
        *,
        k: int | None = None,  # alias of top_k (the name)
    ):
        """use_moe=None: experts are on when any expert argument (num_experts, top_k/k, expert_rank) is given, so
        PolyAdapter(base, rank=8, num_experts=4) builds the 4 experts it names; an explicit use_moe=False keeps them
        off whatever else is given. Defaults with experts on: 4 experts, top_k=min(2, num_experts).

        ia3_recompute: in training, recompute base(x) in backward for IA3's gradient instead of saving it: one
        (tokens, out_features) tensor less per layer for one more base matmul in backward. It pays when x is saved
        anyway (LoRA or experts on, as in poly) or the layer widens (in < out)."""
        super().__init__()
        top_k = top_k if k is None else k
        if use_moe is None:
            use_moe = num_experts is not None or top_k is not None or expert_rank is not None
        num_experts = 4 if num_experts is None else num_experts
        top_k = min(2, num_experts) if top_k is None else top_k
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = base_dims(base_layer)
        self.use_lora, self.use_ia3, self.use_moe = use_lora, use_ia3, use_moe
        self.ia3_recompute = ia3_recompute
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.num_experts, self.top_k = num_experts if use_moe else 0, top_k
        self.expert_rank = (expert_rank or rank) if use_moe else 0
        self.router_aux_weight, self.router_z_weight = router_aux_weight, router_z_weight
        if use_moe and not 1 <= top_k <= num_experts:
            raise AdapterConfigError(f"PolyAdapter: top_k={top_k} must be in [1, num_experts={num_experts}]")
        if use_moe and self.expert_rank < 1:
            raise AdapterConfigError(
                f"PolyAdapter: expert_rank={expert_rank} (rank={rank}) must be >= 1 with experts on")
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base_layer.weight
        kw = dict(device=w.device, dtype=w.dtype if w.is_floating_point() else torch.float32)

        # Parts are created only when switched on at construction; flipping a flag off later just skips them.
        self.lora_A = self.lora_B = None
        if use_lora and rank > 0:
            self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
            # nn.Linear submodules so the state-dict keys are `<path>.lora_A.weight`, as in peft.
            self.lora_A = nn.Linear(self.in_features, rank, bias=False, **kw)
            self.lora_B = nn.Linear(rank, self.out_features, bias=False, **kw)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # torch's Linear default
            nn.init.zeros_(self.lora_B.weight)  # delta starts at exactly zero
        self.ia3_l = nn.Parameter(torch.ones(self.out_features, **kw)) if use_ia3 else None
        self.router = self.expert_A = self.expert_B = None
        if use_moe:
            E, r = self.num_experts, self.expert_rank
            self.expert_scaling = alpha / (math.sqrt(r) if use_rslora else r)
            self.router = nn.Linear(self.in_features, E, bias=False, **kw)
            nn.init.normal_(self.router.weight, std=0.02)  # small: near-uniform routing, ties broken at random
            self.expert_A = nn.Parameter(torch.empty(E * r, self.in_features, **kw))  # expert e = rows e*r:(e+1)*r
            self.expert_B = nn.Parameter(torch.zeros(self.out_features, E * r, **kw))
            for e in range(E):  # each expert initialised like an independent LoRA A
                nn.init.kaiming_uniform_(self.expert_A.data[e * r : (e + 1) * r], a=math.sqrt(5))
        self.merged_parts: tuple[str, ...] = ()  # which of ("lora", "ia3") are folded into the base weight now
        self._router_calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # grad-enabled calls since the last pop
        self._last_top_i: torch.Tensor | None = None  # top-k ids of the last grad-enabled call, for logging
        self.train(base_layer.training)  # a wrapper built around an eval-mode layer runs no dropout

    # The base layer's weight and bias, as peft exposes them: parents may read them (T5's FFN casts its input to
    # `wo.weight.dtype` before calling wo).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_parts)

    def adapter_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("base_layer.")]

    # ---- forward ----
    # Rank-8 adapters cost launches and Python dispatches, not FLOPs: every op below is a kernel on a GPU, so the
    # path is kept to the minimum (LoRA: 2 kernels; experts: 8) and the deltas are added by `_add_low_rank`.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = self.lora_A is not None and self.use_lora and "lora" not in self.merged_parts
        ia3 = self.ia3_l is not None and self.use_ia3 and "ia3" not in self.merged_parts
        moe = self.router is not None and self.use_moe
        if not (lora or ia3 or moe):
            return self.base_layer(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # 2-D throughout: addmm_ needs it, and no view is modified in place
        autocast = torch.is_autocast_enabled(x2.device.type)
        if autocast and x2.is_floating_point():
            # Cast once for the base and the adapters: autocast would cast x in each matmul and save every copy
            # for backward (under bf16 that was ~20% more activation memory for LoRA, ~2x for poly).
            dtype = torch.get_autocast_dtype(x2.device.type)
            if x2.dtype != dtype:
                x2 = x2.to(dtype)
        if ia3 and self.ia3_recompute and torch.is_grad_enabled():
            # checkpoint saves x2 (often saved by the LoRA/expert matmuls already) instead of base(x2).
            out = checkpoint(self._scaled_base, x2, use_reentrant=False, preserve_rng_state=False)
        else:
            out = self._scaled_base(x2) if ia3 else self.base_layer(x2)
        if lora or moe:
            # Adapters may live in another dtype than the base (e.g. bf16 adapters over an int8 base).
            adtype = (self.lora_A.weight if self.lora_A is not None else self.expert_A).dtype
            xa = x2 if autocast or x2.dtype == adtype else x2.to(adtype)  # under autocast the matmuls cast weights
            if not isinstance(self.dropout, nn.Identity):
                xa = self.dropout(xa)
            if lora:
                down, up = F.linear(xa, self.lora_A.weight), self.lora_B.weight
                if down.dtype != out.dtype:  # e.g. an fp32 int8-base output; under autocast `down` is bf16 already
                    down = down.to(out.dtype)
                if up.dtype != out.dtype:  # in-place ops are not autocast: cast the weight ourselves
                    up = up.to(out.dtype)
                out = _add_low_rank(out, down, up, self.scaling)  # out + s (x A^T) B^T
            if moe:
                out = self._add_experts(xa, out)
        return out.view(*lead, self.out_features)

    def _scaled_base(self, x2: torch.Tensor) -> torch.Tensor:
        """IA3: base(x2) scaled per output feature."""
        out, scale = self.base_layer(x2), self.ia3_l
        return out * (scale if scale.dtype == out.dtype else scale.to(out.dtype))

    def route(self, x2: torch.Tensor, dtype: torch.dtype = torch.float32
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x2 (N, in) -> gates (N, E) in `dtype` (zero outside each token's top-k), router logits (N, E) in the
        compute dtype (router_loss takes them to float32), top-k ids (N, k)."""
        logits = F.linear(x2, self.router.weight)
        if self.top_k > 1:
            # The softmax renormalised over the chosen experts IS the softmax of their logits: no full softmax.
            # Softmax accumulates in float32 whatever the input dtype, so the logits are not cast per call.
            top_logits, top_i = logits.topk(self.top_k, dim=-1)
            top_p = top_logits.softmax(-1)
        else:  # k=1 keeps the raw probability (Switch), so the router still gets a gradient from the task loss
            top_p, top_i = logits.softmax(-1, dtype=torch.float32).topk(1, dim=-1)
        gates = logits.new_zeros(logits.shape, dtype=dtype).scatter_(
            1, top_i, top_p if top_p.dtype == dtype else top_p.to(dtype))
        return gates, logits, top_i

    def _add_experts(self, x2: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + the gated sum of the chosen experts' B_e A_e x."""
        E, r = self.num_experts, self.expert_rank
        h = F.linear(x2, self.expert_A)  # (N, E*r): every expert's down-projection at once
        gates, logits, top_i = self.route(x2, h.dtype)
        if torch.is_grad_enabled():
            self._accumulate_aux(logits, top_i)
        # Unselected experts -> exactly zero (value and gradient).
        h = (h.view(-1, E, r) * gates.unsqueeze(-1)).view(-1, E * r)
        up = self.expert_B if self.expert_B.dtype == out.dtype else self.expert_B.to(out.dtype)
        if h.dtype != out.dtype:
            h = h.to(out.dtype)
        return _add_low_rank(out, h, up, self.expert_scaling)  # + sum over the chosen experts of B_e (gated h_e)

    def _accumulate_aux(self, logits: torch.Tensor, top_i: torch.Tensor) -> None:
        # Only remember the call: the router loss is computed when popped, for every call of every layer of the
        # same shape at once (router_loss), not as ~10 small kernels per layer per call. The logits are saved
        # for backward anyway, so keeping them costs no memory.
        # Activation checkpointing re-runs this forward during backward: that call must not count a second time.
        if not _in_backward():
            self._router_calls.append((logits, top_i))
            self._last_top_i = top_i

    @property
    def last_expert_load(self) -> torch.Tensor | None:
        """(E,) fraction of routed slots per expert in the last grad-enabled forward, for logging."""
        if self._last_top_i is None:
            return None
        top_i = self._last_top_i
        counts = torch.zeros(self.num_experts, device=top_i.device).scatter_add_(
            0, top_i.reshape(-1), torch.ones(top_i.numel(), device=top_i.device))
        return counts / top_i.numel()

    def pop_router_calls(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (logits, top-k ids) of the grad-enabled forwards since the last pop; forgets them."""
        calls, self._router_calls = self._router_calls, []
        return calls

    def pop_aux_loss(self) -> torch.Tensor | None:
        """Router loss summed over the grad-enabled forwards since the last pop (None if there were none)."""
        return router_loss(self.pop_router_calls(), self.router_aux_weight, self.router_z_weight)

    # ---- merge ----

    def delta_weight(self) -> torch.Tensor:
        """LoRA's weight delta in torch layout (out, in), float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def _base_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        from athena.adapters.quantize import Int8Linear

        if isinstance(self.base_layer, Int8Linear):
            raise AdapterConfigError("cannot merge adapters into an int8-quantised base; merge before quantize_adapter_model")
        return self.base_layer.weight, getattr(self.base_layer, "bias", None)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold LoRA and IA3 (those switched on) into the base weight: W' = diag(l) W + s B A, b' = l * b."""
        if self.merged:
            return
        parts = []
        weight, bias = self._base_tensors()
        w = weight.float().T if self.fan_in_fan_out else weight.float()  # (out, in) view to work in
        w = w.clone()
        if self.ia3_l is not None and self.use_ia3:
            w *= self.ia3_l.float()[:, None]
            if bias is not None:
                bias.copy_(bias.float() * self.ia3_l.float())
            parts.append("ia3")
        if self.lora_A is not None and self.use_lora:
            w += self.delta_weight()
            parts.append("lora")
        weight.copy_(w.T if self.fan_in_fan_out else w)
        self.merged_parts = tuple(parts)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge() exactly (up to float rounding): W = (W' - s B A) / l, b = b' / l."""
        if not self.merged:
            return
        weight, bias = self._base_tensors()
        w = (weight.float().T if self.fan_in_fan_out else weight.float()).clone()
        if "lora" in self.merged_parts:
            w -= self.delta_weight()
        if "ia3" in self.merged_parts:
            w /= self.ia3_l.float()[:, None]
            if bias is not None:
                bias.copy_(bias.float() / self.ia3_l.float())
        weight.copy_(w.T if self.fan_in_fan_out else w)
        self.merged_parts = ()

    def extra_repr(self) -> str:
        parts = [f"in={self.in_features}, out={self.out_features}"]
        if self.lora_A is not None:
            parts.append(f"lora(rank={self.rank}, scaling={self.scaling:g}){'' if self.use_lora else ' off'}")
        if self.ia3_l is not None:
            parts.append(f"ia3{'' if self.use_ia3 else ' off'}")
        if self.router is not None:
            parts.append(f"experts({self.num_experts}, top_k={self.top_k}, rank={self.expert_rank})"
                         f"{'' if self.use_moe else ' off'}")
        if self.merged:
            parts.append(f"merged={'+'.join(self.merged_parts)}")
        return ", ".join(parts)


def _add_low_rank(out: torch.Tensor, h: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """out + scale * h @ up^T for a base output `out` (N, out), a rank-r `h` (N, r) and `up` (out, r).

    Eager: ONE kernel, cuBLAS adding into `out` in place (addmm_; no supported base layer saves its output for
    backward, so autograd allows it). Compiled, any addmm whose C input is an output-sized tensor runs out of
    place, and ATen's CUDA addmm first copies C in full; an explicit add is cheaper, as Inductor fuses it into
    the next elementwise kernel. It is added on unsqueezed views, because Inductor rewrites add(mm, C) on 2-D
    tensors back into addmm(C, ...) wherever the next op is not elementwise. H100, 1B Llama with CUDA graphs:
    prefill 8.7 -> 8.1 ms of GPU work (as peft); training steps unchanged (LoRA 21.3 vs 21.4 ms, experts 28.2
    vs 28.0), where a flat add had been slower (22.2, 29.3)."""
    if torch.compiler.is_compiling():
        return (out.unsqueeze(0) + (torch.mm(h, up.t()) * scale).unsqueeze(0)).squeeze(0)
    return out.addmm_(h, up.t(), alpha=scale)


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
