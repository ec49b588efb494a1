"""Building blocks of the TRM network: init, RMSNorm, RoPE, attention, SwiGLU, the post-norm block.

Everything here is plain PyTorch and autocast-friendly: weights stay float32, matmuls follow the
autocast dtype, and normalisation / RoPE are computed in float32.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from athena.models.trm.routing import RoutedFFN


def trunc_normal_(tensor: torch.Tensor, std: float, bound: float = 2.0) -> torch.Tensor:
    """Fill `tensor` with a normal truncated at +-bound standard deviations whose ACTUAL std is `std`.

    torch.nn.init.trunc_normal_ cuts the tails without rescaling, so the result has a smaller std than
    asked for (about 0.88x at 2 sigma). We rescale so that `std` is the real one (as JAX/Flax do).
    """
    with torch.no_grad():
        if std == 0:
            return tensor.zero_()
        # Variance of a standard normal truncated to [-bound, bound].
        pdf = math.exp(-0.5 * bound**2) / math.sqrt(2 * math.pi)
        mass = math.erf(bound / math.sqrt(2))
        truncated_std = math.sqrt(1 - 2 * bound * pdf / mass)
        scale = std / truncated_std
        nn.init.trunc_normal_(tensor, mean=0.0, std=1.0, a=-bound, b=bound)
        return tensor.mul_(scale)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, without a learnable weight; computed in float32, returned in x's dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
    return x32.to(x.dtype)


class Linear(nn.Module):
    """Bias-free (by default) linear layer with truncated LeCun-normal init (std = 1/sqrt(fan_in))."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(trunc_normal_(torch.empty(out_features, in_features), std=in_features**-0.5))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE tables for every position of the sequence (puzzle-embedding tokens included)."""

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (head_dim/2,)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (len, head_dim/2)
        # Rotate-half layout: the first half of each head pairs with the second half.
        angles = torch.cat((angles, angles), dim=-1)  # (len, head_dim)
        # Not persistent: they are a deterministic function of the config.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos, self.sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); cos/sin: (seq, head_dim). Rotation done in float32."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]  # (seq, 1, head_dim) broadcast over heads
    return (x32 * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Non-causal multi-head self-attention with a fused qkv projection and RoPE."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv_proj = Linear(hidden_size, 3 * hidden_size)
        self.o_proj = Linear(hidden_size, hidden_size)
        # arch.amrpa_window > 0: attention_memory.RecursionMemory's hook (a plain callable, its weights live there),
        # attention through explicit probabilities mixed with this layer's patterns at earlier recursion steps.
        self.memory = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv_proj(x).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=2)  # each (batch, seq, heads, head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, head_dim)
        if self.memory is not None:
            y = self.memory(q, k, v, x)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        y = y.transpose(1, 2).reshape(B, L, D)  # (batch, seq, hidden)
        return self.o_proj(y)


def swiglu_intermediate_size(width: int, expansion: float) -> int:
    """expansion * width * 2/3 (keeps SwiGLU's params equal to a plain MLP's), rounded up to a multiple of 256."""
    target = round(expansion * width * 2 / 3)
    return 256 * math.ceil(target / 256)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) over the last dim of width `width`."""

    def __init__(self, width: int, expansion: float):
        super().__init__()
        self.intermediate = swiglu_intermediate_size(width, expansion)
        self.gate_up_proj = Linear(width, 2 * self.intermediate)
        self.down_proj = Linear(self.intermediate, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """One post-norm layer: mix positions (attention, or an MLP across the sequence), then a SwiGLU.

    mixer="attention": h = norm(h + attn(h))                              norm over hidden
    mixer="mlp"      : h^T = norm(h^T + swiglu_seq(h^T)), h^T = (B, D, L)  norm over the sequence axis,
                       exactly as the official TRM-MLP does (the mixer's residual lives in the transposed frame)
    then             : h = norm(h + swiglu(h))   (ffn_capacity < 1: on the router's positions only, routing.py)
    """

    def __init__(self, hidden_size: int, num_heads: int, expansion: float, mixer: str, total_len: int, eps: float,
                 ffn_capacity: float = 1.0):
        super().__init__()
        self.mixer, self.eps = mixer, eps
        if mixer == "attention":
            self.attn = Attention(hidden_size, num_heads)
        else:
            self.seq_mlp = SwiGLU(total_len, expansion)
        self.mlp = SwiGLU(hidden_size, expansion)
        # Built after the block's own weights, and only when routing: capacity 1.0 draws the same init as before.
        self.routed_ffn = RoutedFFN(hidden_size, ffn_capacity) if ffn_capacity < 1 else None

    def forward(self, h: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        # h: (batch, seq, hidden). cos/sin are passed separately (not as a tuple) so checkpoint() sees tensors.
        if self.mixer == "attention":
            rope = None if cos is None else (cos, sin)
            h = rms_norm(h + self.attn(h, rope), self.eps)
        else:
            # Transposed frame: measured 3.5% faster on an H100 than left products W @ h (docs/benchmarks.md).
            ht = h.transpose(1, 2)  # (batch, hidden, seq)
            ht = rms_norm(ht + self.seq_mlp(ht), self.eps)
            h = ht.transpose(1, 2)
        if self.routed_ffn is not None:
            return self.routed_ffn(h, self.mlp, self._norm)
        return rms_norm(h + self.mlp(h), self.eps)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.eps)
