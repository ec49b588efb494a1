"""HierarchicalAdaptiveWrapper: a frozen Llama-layout causal LM run layer by layer with exit gates and capacity routers.

    model = HierarchicalAdaptiveWrapper(base_model, exit_layers=None, capacity=0.55)
    logits = model(input_ids=ids).logits                  # the base's output shape: (batch, seq, vocab)
    tokens = model.generate(ids, max_new_tokens=32)       # greedy, with the KV cache below

One forward, in the order data flows:
    embed -> for each decoder layer:
        attention: keys/values from every token (an exited token's from its exit state), queries from the active
                   tokens only (eval: gathered; the attention kernel itself still sees a dense query block)
        FFN:       the router picks round(capacity x active tokens) per sequence (or, causal, those over its
                   threshold); only those are gathered, normed, run through the MLP and scattered back with the
                   residual; the others pass the FFN residual unchanged
        gate:      at an exit layer, tokens whose gate fires stop: their hidden state is kept as it is from here on
    -> final norm + LM head on every token's final state (its exit state if it left early)

Host syncs: top-k routing with no exit needs none (the count per sequence is known on the host). Each exit gate
costs one (the active count per sequence: sizes of the following gathers), causal routing one per layer (a
data-dependent count). Training computes every token densely (an exited token's state is frozen with `where`, so
the forward equals eval's) because a gate's straight-through gradient needs the continued state of tokens that left.

KV cache strategy for exited tokens (CALM's "copy the state upward"): every layer computes keys and values for every
token, an exited token's from its frozen exit state, and the cache holds them for all layers. Later tokens attend to
it at every depth exactly as in the uncached forward; its cost is the k/v projections of exited tokens.
Decoding with a cache routes causally (a top-k over a prefix would change as tokens arrive), so cached decoding
equals an uncached causal-mode forward over the same tokens.

capacity 1.0 with no exit layers runs the base's own operations in its order: the same logits, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from athena.adaptive.capacity_router import CapacityRouter, round_half_up, straight_through_scale
from athena.adaptive.config import AdaptiveConfigError, ExitConfig, check_exit_layers, default_exit_layers
from athena.adaptive.exit_gates import ExitGate
from athena.adaptive.layout import decoder_parts

_DEFAULTS = ExitConfig()


@dataclass
class LMOutput:
    """What a Hugging Face causal LM's forward returns, as far as callers here read it."""
    logits: torch.Tensor
    past_key_values: AdaptiveCache | None = None
    loss: torch.Tensor | None = None

    def __getitem__(self, key):  # lm-eval and generate helpers index outputs like a dict
        return getattr(self, key)


class AdaptiveCache:
    """Keys and values of every past token for every layer, (batch, kv_heads, tokens, head_dim) each. An exited
    token's entries at layers above its exit come from its exit state (see the module docstring)."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == len(self.keys):
            self.keys.append(keys)
            self.values.append(values)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], keys], dim=2)
            self.values[layer] = torch.cat([self.values[layer], values], dim=2)
        return self.keys[layer], self.values[layer]


@dataclass
class ForwardStats:
    """What the last forward did; host numbers where they are known without a sync, tensors otherwise."""
    active: list[int] = field(default_factory=list)  # per layer: tokens active (all sequences)
    routed: list[int] = field(default_factory=list)  # per layer: tokens whose FFN ran
    router_load: list[torch.Tensor] = field(default_factory=list)  # per layer: mean sigmoid(score) over active
    z_loss: list[torch.Tensor] = field(default_factory=list)
    entropy: list[torch.Tensor] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)  # per gate: tokens that left there
    tokens: int = 0

    @property
    def realised_capacity(self) -> list[float]:
        return [r / a if a else 0.0 for r, a in zip(self.routed, self.active)]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q, k, cos, sin):
    """Rotary embedding as Llama applies it ((batch, heads, seq, head_dim); cos/sin (batch, seq, head_dim))."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def nonzero_of(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of a bool mask whose count the host already knows (no second sync)."""
    try:
        return torch.nonzero_static(mask, size=count).squeeze(1)
    except (AttributeError, NotImplementedError, RuntimeError):
        return mask.nonzero().squeeze(1)


class HierarchicalAdaptiveWrapper(nn.Module):
    """Exit gates after a few decoder layers and a capacity router on every layer, over a (frozen) base model.

    exit_layers: gates after these decoder layers (1-based); None: five spread like 4/8/12/16/19 of 22; []: none.
    capacity: share of each layer's active tokens that runs the FFN (1.0: all). routing: topk | causal. The other
    knobs are ExitConfig's (athena/adaptive/config.py, where each is explained)."""

    def __init__(self, base_model: nn.Module, exit_layers: list[int] | None = None,
                 capacity: float = _DEFAULTS.capacity, routing: str = _DEFAULTS.routing, phase: str = _DEFAULTS.phase,
                 tau_forward: float = _DEFAULTS.tau_forward, tau_backward: float = _DEFAULTS.tau_backward,
                 gate_bias_init: float = _DEFAULTS.gate_bias_init, z_loss_weight: float = _DEFAULTS.z_loss_weight,
                 entropy_weight: float = _DEFAULTS.entropy_weight, exit_cost_weight: float = _DEFAULTS.exit_cost_weight,
                 threshold_momentum: float = _DEFAULTS.threshold_momentum, freeze_base: bool = _DEFAULTS.freeze_base):
        super().__init__()
        try:  # the one schema's checks, for plain-Python callers too
            ExitConfig(exit_layers=exit_layers, capacity=capacity, routing=routing, phase=phase,
                       tau_forward=tau_forward, tau_backward=tau_backward, z_loss_weight=z_loss_weight,
                       entropy_weight=entropy_weight, exit_cost_weight=exit_cost_weight,
                       threshold_momentum=threshold_momentum)
        except ValueError as error:
            first = error.errors()[0] if hasattr(error, "errors") else None
            where = ".".join(str(p) for p in first["loc"]) if first else ""
            message = first["msg"].removeprefix("Value error, ") if first else str(error)
            prefix = f"{where}: " if where else ""
            raise AdaptiveConfigError(f"HierarchicalAdaptiveWrapper: {prefix}{message}") from None
        if isinstance(base_model, HierarchicalAdaptiveWrapper):
            raise AdaptiveConfigError("HierarchicalAdaptiveWrapper: the model is already wrapped")
        self.base = base_model
        self.parts = decoder_parts(base_model)
        depth = len(self.parts.layers)
        hidden = base_model.config.hidden_size
        self.exit_layers = check_exit_layers(default_exit_layers(depth) if exit_layers is None else exit_layers, depth)
        self.capacity, self.routing = float(capacity), routing
        self.tau_forward, self.tau_backward = tau_forward, tau_backward
        self.z_loss_weight, self.entropy_weight = z_loss_weight, entropy_weight
        self.exit_cost_weight, self.threshold_momentum = exit_cost_weight, threshold_momentum
        weight = self.parts.embed.weight
        self.routers = nn.ModuleList(CapacityRouter(hidden) for _ in range(depth)).to(weight.device)
        self.gates = nn.ModuleDict({str(layer): ExitGate(hidden, gate_bias_init) for layer in self.exit_layers}
                                   ).to(weight.device)
        if freeze_base:
            for param in self.base.parameters():
                param.requires_grad_(False)
        self.set_phase(phase)
        self.collect_stats = True  # per-forward statistics (a few small reductions); benchmarks switch it off
        self.last_stats: ForwardStats | None = None
        self._aux: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------- what trains
    def set_phase(self, phase: str) -> None:
        """routers: routers train, exits off; exit: gates train over the routers as they are; full: both."""
        if phase not in ("routers", "exit", "full"):
            raise AdaptiveConfigError(f"phase must be routers, exit or full, got {phase!r}")
        self.phase = phase
        self.exits_enabled = phase != "routers"
        for param in self.routers.parameters():
            param.requires_grad_(phase in ("routers", "full"))
        for param in self.gates.parameters():
            param.requires_grad_(phase in ("exit", "full"))

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """The weighted auxiliary losses of the forwards since the last call (training forwards with grad)."""
        out, self._aux = self._aux, {}
        return out

    # ------------------------------------------------------------------------------------------- HF look-alike
    @property
    def config(self):
        return self.base.config

    @property
    def device(self) -> torch.device:
        return self.parts.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.parts.embed.weight.dtype

    @property
    def name_or_path(self) -> str:
        return getattr(self.base, "name_or_path", "") or "athena-adaptive"

    @property
    def generation_config(self):
        return getattr(self.base, "generation_config", None)

    def tie_weights(self, *args, **kwargs) -> None:
        """lm-eval calls it; the base's weights are tied as it was built."""

    def get_input_embeddings(self) -> nn.Module:
        return self.parts.embed

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: AdaptiveCache | None = None, use_cache: bool | None = None,
                routing: str | None = None, **unused) -> LMOutput:
        cache = past_key_values if past_key_values is not None else (AdaptiveCache() if use_cache else None)
        routing = "causal" if cache is not None else (routing or self.routing)
        B, L = input_ids.shape
        past = cache.length() if cache is not None else 0
        h = self.parts.embed(input_ids)  # (B, L, D)
        positions = torch.arange(past, past + L, device=h.device)[None]
        cos, sin = self.parts.rotary(h, positions)
        mask = attention_bias(attention_mask, L, past, h.device)
        training = self.training and torch.is_grad_enabled()
        stats = ForwardStats(tokens=B * L) if self.collect_stats else None
        self._cost_terms: list[torch.Tensor] = []

        alive = None          # (B, L) bool: tokens still computing; None: all of them
        counts = [L] * B      # active tokens per sequence, on the host
        active_idx = None     # eval after an exit: flat indices of the active tokens
        stay = None           # training after a gate: cumulative soft stay probability (B, L), for gradients
        layers_before_gate = 0
        depth = len(self.parts.layers)
        exit_layer = torch.full((B, L), depth, device=h.device)  # the token-state tracker: where each token left
        for i, layer in enumerate(self.parts.layers):
            if not training and alive is not None and not any(counts) and cache is None:
                break  # every token has left; nothing later reads keys and values
            h_new = self._attention(i, layer, h, cos, sin, mask, cache, active_idx)
            if self._recording is not None:
                self._recording[("ffn", i)] = h_new
            h_new = self._ffn(i, layer, h_new, alive, counts, routing, training, stats)
            if training and alive is not None:  # dense training: exited tokens keep their state exactly
                blend = (stay - stay.detach()).unsqueeze(-1).to(h.dtype) * (h_new - h).detach()  # 0 in forward
                h = torch.where(alive.unsqueeze(-1), h_new, h) + blend
            else:
                h = h_new
            if stay is not None:
                self._cost_terms.append(stay)
            else:
                layers_before_gate += 1
            if self._recording is not None:
                self._recording[("gate", i + 1)] = h
            gate = self.gates[str(i + 1)] if self.exits_enabled and str(i + 1) in self.gates else None
            if gate is not None:
                exit_hard, stay_soft, _ = gate.decide(h, self.tau_forward, self.tau_backward)
                leaving = exit_hard if alive is None else exit_hard & alive
                exit_layer = exit_layer.masked_fill(leaving, i + 1)
                alive = ~exit_hard if alive is None else alive & ~exit_hard
                before = sum(counts)
                counts = alive.sum(-1).tolist()  # the one host sync of this gate
                if stats is not None:
                    stats.exits.append(before - sum(counts))
                if training:
                    stay = stay_soft if stay is None else stay * stay_soft
                else:
                    active_idx = nonzero_of(alive.flatten(), sum(counts))
        if training and self._cost_terms and self.exit_cost_weight > 0:
            share = (layers_before_gate + torch.stack(self._cost_terms).sum(0)) / depth  # (B, L) soft depth share
            self._add_aux("exit_cost", self.exit_cost_weight * share.mean())
        self.last_stats, self.last_exit_layer = stats, exit_layer
        logits = self.parts.lm_head(self.parts.norm(h))
        return LMOutput(logits=logits, past_key_values=cache)

    def _attention(self, i, layer, h, cos, sin, mask, cache, active_idx):
        attn = layer.self_attn
        B, L, D = h.shape
        x = layer.input_layernorm(h)
        hd = attn.head_dim
        k = attn.k_proj(x).view(B, L, -1, hd).transpose(1, 2)
        v = attn.v_proj(x).view(B, L, -1, hd).transpose(1, 2)
        if active_idx is None:
            q = attn.q_proj(x).view(B, L, -1, hd).transpose(1, 2)
        else:  # queries of the active tokens only, placed in a dense block for the attention kernel
            rows = attn.q_proj(x.reshape(B * L, D)[active_idx])
            q = rows.new_zeros(B * L, rows.shape[-1]).index_copy(0, active_idx, rows)
            q = q.view(B, L, -1, hd).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(i, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=attn.scaling,
                                             is_causal=mask is None and L > 1, enable_gqa=q.shape[1] != k.shape[1])
        out = out.transpose(1, 2).reshape(B, L, -1)
        if active_idx is None:
            return h + attn.o_proj(out)
        flat = h.reshape(B * L, D)
        rows = flat[active_idx] + attn.o_proj(out.reshape(B * L, -1)[active_idx])
        return flat.index_copy(0, active_idx, rows).view(B, L, D)

    def _ffn(self, i, layer, h, alive, counts, routing, training, stats):
        B, L, D = h.shape
        router = self.routers[i]
        if self.capacity >= 1.0:  # every active token: the base's own dense FFN
            if stats is not None:
                stats.active.append(sum(counts))
                stats.routed.append(sum(counts))
            if alive is None:
                return h + layer.mlp(layer.post_attention_layernorm(h))
            selected = nonzero_of(alive.flatten(), sum(counts))
            return self._run_ffn(layer, h, selected, None)
        scores = router.scores(h)  # (B, L), float32
        if routing == "topk":
            selected, boundary = self._top_k(scores, alive, counts, L)
            if training:
                router.track_threshold(boundary, self.threshold_momentum)
        else:  # causal: each token against the layer's threshold (a data-dependent count: one sync)
            chosen = scores > router.threshold
            if alive is not None:
                chosen &= alive
            selected = chosen.flatten().nonzero().squeeze(1)
        if stats is not None or training:
            self._router_terms(scores, alive, counts, training, stats)
        if stats is not None:
            stats.active.append(sum(counts))
            stats.routed.append(int(selected.numel()))
        gate = torch.sigmoid(scores.flatten()[selected]) if training and router.proj.weight.requires_grad else None
        return self._run_ffn(layer, h, selected, gate)

    @staticmethod
    def _run_ffn(layer, h, selected, gate):
        """Gather the selected tokens, run norm + MLP on them only, scatter back with the residual."""
        B, L, D = h.shape
        flat = h.reshape(B * L, D)
        rows = flat[selected]
        y = layer.mlp(layer.post_attention_layernorm(rows))
        if gate is not None:
            y = straight_through_scale(y, gate)
        return flat.index_copy(0, selected, rows + y).view(B, L, D)

    def _top_k(self, scores, alive, counts, L):
        """Per sequence the round(capacity x active) best-scoring active tokens: flat indices, and the mean score at
        the boundary (what the causal threshold tracks). No host sync: the counts are known."""
        ks = [round_half_up(self.capacity * n) for n in counts]
        k_max = max(ks)
        masked = scores if alive is None else scores.masked_fill(~alive, float("-inf"))
        top = masked.topk(k_max, dim=-1)
        flat = top.indices + torch.arange(len(ks), device=scores.device).unsqueeze(1) * L
        if all(k == k_max for k in ks):
            selected = flat.flatten()
            boundary = top.values[:, max(k_max - 1, 0)]
        else:
            selected = torch.cat([flat[b, :k] for b, k in enumerate(ks)])
            last = torch.tensor([max(k - 1, 0) for k in ks], device=scores.device)
            boundary = top.values.gather(1, last.unsqueeze(1)).squeeze(1)
        live = [k > 0 for k in ks]
        boundary = boundary[torch.tensor(live, device=scores.device)] if not all(live) else boundary
        boundary = boundary.clamp(-1e4, 1e4).mean() if boundary.numel() else scores.new_zeros(())
        return selected, boundary

    def _router_terms(self, scores, alive, counts, training, stats):
        weight = None if alive is None else alive.to(scores.dtype)
        n = max(sum(counts), 1)

        def mean(x):
            return x.mean() if weight is None else (x * weight).sum() / n

        z = mean(F.softplus(scores).square())
        p = torch.sigmoid(scores)
        entropy = mean(-(p * F.logsigmoid(scores) + (1 - p) * F.logsigmoid(-scores)))
        if training and self.routers[0].proj.weight.requires_grad:
            self._add_aux("router_z_loss", self.z_loss_weight * z / len(self.parts.layers))
            self._add_aux("router_entropy", self.entropy_weight * entropy / len(self.parts.layers))
        if stats is not None:
            stats.z_loss.append(z.detach())
            stats.entropy.append(entropy.detach())
            stats.router_load.append(mean(p).detach())

    def _add_aux(self, name: str, value: torch.Tensor) -> None:
        self._aux[name] = self._aux[name] + value if name in self._aux else value

    # ------------------------------------------------------------------------------------------- decoding
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, eos_token_id: int | None = None,
                 use_cache: bool = True, **unused) -> torch.Tensor:
        """Greedy decoding: (B, prompt) -> (B, prompt + new). Routing is causal (see the module docstring); with
        use_cache=False every step reruns the whole sequence (the reference the cache is tested against)."""
        cache = AdaptiveCache() if use_cache else None
        tokens, step = input_ids, input_ids
        for _ in range(max_new_tokens):
            if cache is not None:
                logits = self(step, past_key_values=cache).logits[:, -1]
            else:
                logits = self(tokens, routing="causal").logits[:, -1]
            step = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, step], dim=1)
            if eos_token_id is not None and bool((step == eos_token_id).all()):
                break
        return tokens

    @torch.no_grad()
    def calibrate(self, input_ids: torch.Tensor, exit_rates: list[float] | None = None) -> None:
        """Thresholds from one dense pass (capacity 1, no exits) over sample tokens: each router's causal threshold
        so that `capacity` of the tokens pass it, and (exit_rates: one share per gate) each gate's so that about that
        share of all tokens exits there: a fixed exit profile for speed measurements, where what the gates learned
        does not matter. The realised shares differ a little (a token that left earlier cannot leave again)."""
        if exit_rates is not None and len(exit_rates) != len(self.exit_layers):
            raise AdaptiveConfigError(f"calibrate: {len(exit_rates)} exit rates for {len(self.exit_layers)} gates")
        was_training, capacity, exits = self.training, self.capacity, self.exits_enabled
        self.eval()
        self.capacity, self.exits_enabled, self._recording = 1.0, False, {}
        try:
            self(input_ids)
            seen = self._recording
        finally:
            self.capacity, self.exits_enabled, self._recording = capacity, exits, None
            self.train(was_training)
        for i, router in enumerate(self.routers):
            router.calibrate(router.scores(seen[("ffn", i)]), capacity)
        for layer, rate in zip(self.exit_layers, exit_rates or []):
            gate = self.gates[str(layer)]
            gate.calibrate(gate.logits(seen[("gate", layer)]), rate)

    _recording: dict | None = None


def attention_bias(attention_mask: torch.Tensor | None, L: int, past: int, device) -> torch.Tensor | None:
    """None when plain causal attention fits (no padding; no cache, or one new token); else a bool mask
    (B, 1, L, past + L): causal over the cache, and keys that are padding masked out."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (past == 0 or L == 1):
        return None
    rows = torch.arange(past, past + L, device=device)[:, None]
    causal = rows >= torch.arange(past + L, device=device)[None, :]
    mask = causal[None, None]
    if padded:
        mask = mask & attention_mask[:, None, None, -(past + L):].bool()
    return mask


def wrap_model(model: nn.Module, **kwargs) -> HierarchicalAdaptiveWrapper:
    return HierarchicalAdaptiveWrapper(model, **kwargs)
