"""PolyAdapter: one wrapper around a linear layer composing IA3, LoRA and routed LoRA experts (parts/).

    out = base(x) * ia3            (IA3: scales the OUTPUT features of the wrapped layer; init ones)
        + lora_B(lora_A(drop(x))) * scaling
        + sum_{e in top-k(x)} gate_e(x) * B_e(A_e(drop(x))) * expert_scaling

A layer holds the parts its arguments name, and only those: the forward runs the ones that exist and are
switched on. Each part's switch is a plain attribute (`layer.use_lora = False`); all off is exactly `base(x)`.
LoRA B and every expert B start at zero, IA3 at one, so a fresh adapter equals the base exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from athena.adapters.base import AdapterLayer, DeferredLoss
from athena.adapters.config import AdapterConfig, AdapterConfigError
from athena.adapters.linear import Int8Linear, base_dims
from athena.adapters.parts.experts import RoutedExperts, router_loss
from athena.adapters.parts.ia3 import IA3
from athena.adapters.parts.lora import LoRA


class PolyAdapter(AdapterLayer):
    def __init__(
        self,
        base_layer: nn.Module | None = None,
        rank: int = AdapterConfig.rank,
        alpha: float = AdapterConfig.alpha,
        dropout: float = AdapterConfig.dropout,
        use_lora: bool = True,
        use_ia3: bool = False,
        use_moe: bool | None = None,
        num_experts: int | None = None,
        top_k: int | None = None,
        expert_rank: int | None = None,
        use_rslora: bool = AdapterConfig.use_rslora,
        router_aux_weight: float = AdapterConfig.router_aux_weight,
        router_z_weight: float = AdapterConfig.router_z_weight,
        ia3_recompute: bool = AdapterConfig.ia3_recompute,
        *,
        k: int | None = None,  # alias of top_k (the name)
        in_features: int | None = None,
        out_features: int | None = None,
        bias: bool = True,
    ):
        """Wraps `base_layer`, or, when none is given, a new nn.Linear(in_features, out_features, bias) that it
        builds itself (as other PEFT libraries' LoRA layers do; its weight is not frozen here).

        use_moe=None: experts are on when any expert argument (num_experts, top_k/k, expert_rank) is given, so
        PolyAdapter(base, rank=8, num_experts=4) builds the 4 experts it names; an explicit use_moe=False keeps them
        off whatever else is given. Defaults with experts on: AdapterConfig's num_experts, top_k at most that.

        ia3_recompute: see parts/ia3.py."""
        super().__init__(_base_layer(base_layer, in_features, out_features, bias))
        top_k = top_k if k is None else k
        if use_moe is None:
            use_moe = num_experts is not None or top_k is not None or expert_rank is not None
        num_experts = AdapterConfig.num_experts if num_experts is None else num_experts
        top_k = min(AdapterConfig.top_k, num_experts) if top_k is None else top_k
        self.in_features, self.out_features, self.fan_in_fan_out = base_dims(self.base_layer)
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
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # one draw shared by LoRA and experts
        self._router_calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # grad-enabled calls since the last pop
        self._last_top_i: torch.Tensor | None = None  # top-k ids of the last grad-enabled call, for logging
        self.merged_parts: tuple[str, ...] = ()  # which of ("ia3", "lora") are folded into the base weight now

        # Parts are built only when switched on at construction; switching one off later just skips it.
        wanted = {IA3: use_ia3, LoRA: use_lora and rank > 0, RoutedExperts: use_moe}
        w = self.base_layer.weight
        factory = dict(device=w.device, dtype=w.dtype if w.is_floating_point() else torch.float32)
        for part, on in wanted.items():
            for tensor in part.tensors:
                setattr(self, tensor, None)
            if on:
                part.build(self, **factory)
        # IA3 scales the base output; LoRA and the experts add deltas to it, in this order.
        self.output_scale = IA3 if wanted[IA3] else None
        self.deltas = tuple(part for part in (LoRA, RoutedExperts) if wanted[part])
        self.follow_base_layer_mode()

    @property
    def part_names(self) -> tuple[str, ...]:
        return tuple(part.name for part in self._parts())

    def _parts(self) -> tuple:
        return ((self.output_scale,) if self.output_scale is not None else ()) + self.deltas

    def _active(self, part) -> bool:
        return getattr(self, part.switch) and part.name not in self.merged_parts

    # ---- forward ----
    # Rank-8 adapters cost launches and Python dispatches, not FLOPs: every op below is a kernel on a GPU, so the
    # path is kept to the minimum (LoRA: 2 kernels; experts: 8) and the deltas are added by `add_low_rank`.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.output_scale if self.output_scale is not None and self._active(self.output_scale) else None
        deltas = [part for part in self.deltas if self._active(part)]
        if scale is None and not deltas:
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
        out = scale.base_output(self, x2) if scale is not None else self.base_layer(x2)
        if deltas:
            # Adapters may live in another dtype than the base (e.g. bf16 adapters over an int8 base).
            adtype = deltas[0].weight_dtype(self)
            xa = x2 if autocast or x2.dtype == adtype else x2.to(adtype)  # under autocast the matmuls cast weights
            if not isinstance(self.dropout, nn.Identity):
                xa = self.dropout(xa)
            for part in deltas:
                out = part.add_delta(self, xa, out)
        return out.view(*lead, self.out_features)

    # ---- routing and the deferred router loss ----

    def route(self, x2: torch.Tensor, dtype: torch.dtype = torch.float32
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gates (N, E), router logits (N, E) and top-k ids (N, k) for tokens x2 (N, in): parts/experts.py."""
        return RoutedExperts.route(self, x2, dtype)

    @property
    def last_expert_load(self) -> torch.Tensor | None:
        """(E,) fraction of routed slots per expert in the last grad-enabled forward, for logging."""
        return RoutedExperts.last_load(self)

    def pop_router_calls(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (logits, top-k ids) of the grad-enabled forwards since the last pop; forgets them."""
        calls, self._router_calls = self._router_calls, []
        return calls

    def pop_aux_loss(self) -> torch.Tensor | None:
        """Router loss summed over the grad-enabled forwards since the last pop (None if there were none)."""
        return router_loss(self.pop_router_calls(), self.router_aux_weight, self.router_z_weight)

    def pop_deferred_losses(self) -> list[DeferredLoss]:
        if self.router is None:
            return []
        return [DeferredLoss(router_loss, (self.router_aux_weight, self.router_z_weight), self.pop_router_calls())]

    # ---- merge ----

    @property
    def merged(self) -> bool:
        return bool(self.merged_parts)

    def _base_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(self.base_layer, Int8Linear):
            raise AdapterConfigError("cannot merge adapters into an int8-quantised base; merge before quantize_adapter_model")
        return self.base_layer.weight, getattr(self.base_layer, "bias", None)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the mergeable parts that are on into the base weight, IA3 first: W' = diag(l) W + s B A,
        b' = l * b."""
        if self.merged:
            return
        weight, bias = self._base_tensors()
        w = (weight.float().T if self.fan_in_fan_out else weight.float()).clone()  # (out, in) to work in
        merged = []
        for part in self._parts():
            if part.mergeable and getattr(self, part.switch):
                part.merge(self, w, bias)
                merged.append(part.name)
        weight.copy_(w.T if self.fan_in_fan_out else w)
        self.merged_parts = tuple(merged)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge() exactly (up to float rounding), in reverse order: W = (W' - s B A) / l, b = b' / l."""
        if not self.merged:
            return
        weight, bias = self._base_tensors()
        w = (weight.float().T if self.fan_in_fan_out else weight.float()).clone()
        for part in reversed(self._parts()):
            if part.name in self.merged_parts:
                part.unmerge(self, w, bias)
        weight.copy_(w.T if self.fan_in_fan_out else w)
        self.merged_parts = ()

    def _experts_run(self) -> bool:
        return self.router is not None and self.use_moe

    def unmergeable(self) -> tuple[str, nn.Module] | None:
        return ("experts", self) if self._experts_run() else None

    def unloaded(self) -> nn.Module:
        return self if self._experts_run() else self.base_layer

    def extra_repr(self) -> str:
        parts = [f"in={self.in_features}, out={self.out_features}"]
        parts += [f"{part.describe(self)}{'' if getattr(self, part.switch) else ' off'}" for part in self._parts()]
        if self.merged:
            parts.append(f"merged={'+'.join(self.merged_parts)}")
        return ", ".join(parts)


def _base_layer(layer: nn.Module | None, in_features: int | None, out_features: int | None, bias: bool) -> nn.Module:
    """The layer to wrap: the one given (whose shape must match in/out_features when those are given too), or a new
    nn.Linear(in_features, out_features, bias)."""
    if layer is None:
        if in_features is None or out_features is None:
            raise AdapterConfigError("PolyAdapter needs a base layer to wrap, or in_features and out_features to "
                                     "build an nn.Linear of that shape")
        return nn.Linear(in_features, out_features, bias=bias)
    for name, given, actual in zip(("in_features", "out_features"), (in_features, out_features), base_dims(layer)):
        if given is not None and given != actual:
            raise AdapterConfigError(f"PolyAdapter: {name}={given} does not match the base layer's {actual}; "
                                     "give the layer or its shape, not both")
    return layer
