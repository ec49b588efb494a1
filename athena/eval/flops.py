"""Model FLOPs of a TRM training step, counted from its config: the numerator of MFU (bench/throughput.py)."""

from __future__ import annotations

from athena.models.trm.layers import swiglu_intermediate_size


def layer_flops(arch: dict, seq_len: int, ffn_positions: int | None = None) -> tuple[int, int]:
    """(mixer, channel FFN) matmul FLOPs of one layer's application on one sample, forward; the FFN on
    `ffn_positions` of the L positions (default all: the dense model; capacity routing runs it on fewer)."""
    D, L = arch["hidden_size"], arch["puzzle_emb_len"] + seq_len
    inter = swiglu_intermediate_size(D, arch["expansion"])
    if arch["mixer"] == "attention":
        mixer = 2 * L * (D * 3 * D + D * D) + 4 * L * L * D
    else:
        inter_seq = swiglu_intermediate_size(L, arch["expansion"])
        mixer = 2 * D * (L * 2 * inter_seq + inter_seq * L)
    ffn = 2 * (L if ffn_positions is None else ffn_positions) * (D * 2 * inter + inter * D)
    return mixer, ffn


def flops_per_sample_step(arch: dict, seq_len: int, vocab_size: int) -> float:
    """Matmul FLOPs of one supervision step for one sample, forward + backward.

    One application of the 2-layer net on all L = puzzle_emb_len + seq_len positions costs, per layer:
      attention mixer: 2*L*(D*3D + D*D)  (qkv, out)  +  2*2*L*L*D  (scores and weighted sum)
      MLP mixer:       2*D*(L*2I_L + I_L*L)          (SwiGLU over the sequence axis, I_L = its hidden width)
      then SwiGLU:     2*L*(D*2I + I*D)
    Per supervision step the net runs H_cycles*(L_cycles+1) times forward; only the last H cycle (L_cycles+1
    applications) is differentiated, and its backward costs 2x its forward. The output head adds
    2*seq_len*D*V forward (x3 with backward). Elementwise work (norms, RoPE, activations) is not counted.
    """
    net = arch["num_layers"] * sum(layer_flops(arch, seq_len))
    applications = arch["H_cycles"] * (arch["L_cycles"] + 1) + 2 * (arch["L_cycles"] + 1)
    head = 3 * 2 * seq_len * arch["hidden_size"] * vocab_size
    return float(net * applications + head)
