"""TRMConfig: the hyperparameters of a Tiny Recursive Model, their defaults (the paper's TRM-Att) and their rules.

The one schema of the `arch` config node for TRM: the model builds itself from it and the run config validates
`arch=...` with it before any compute. Plain pydantic, no torch, so a bad config stops in milliseconds. The sizes
that come from the data (vocab, sequence length, puzzle ids) are the model's own arguments, not part of it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from athena.memory.amrpa.config import AMRPAConfig

_AMRPA = AMRPAConfig()  # the amrpa_* defaults are AMRPA's own

MIXERS = ("attention", "mlp")
LOSS_TYPES = ("stablemax", "softmax")
STREAM_DTYPES = ("float32", "autocast")


class TRMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = Field(default=512, gt=0)
    num_heads: int = Field(default=8, gt=0)  # attention only: the MLP mixer has no heads
    expansion: float = Field(default=4.0, gt=0)  # SwiGLU width / hidden_size
    num_layers: int = Field(default=2, gt=0)
    H_cycles: int = Field(default=3, ge=1)  # outer cycles per supervision step; all but the last without grad
    L_cycles: int = Field(default=6, ge=1)  # latent updates per outer cycle
    halt_max_steps: int = Field(default=16, ge=1)  # supervision steps per puzzle at most (always, in eval)
    halt_exploration_prob: float = Field(default=0.1, ge=0, le=1)
    puzzle_emb_len: int = Field(default=16, ge=0)  # puzzle-identifier prefix tokens; 0 disables the embedding
    # Learned values per puzzle identifier; None = hidden_size as in official TRM (only the first prefix token is
    # learned, the rest are zeros). Up to puzzle_emb_len * hidden_size.
    puzzle_emb_dim: int | None = Field(default=None, gt=0)
    mixer: Literal["attention", "mlp"] = "attention"  # token mixing: RoPE attention or TRM-MLP's sequence MLP
    rope_theta: float = Field(default=10000.0, gt=0)
    rms_norm_eps: float = Field(default=1e-5, gt=0)
    halt_loss_weight: float = Field(default=0.5, ge=0)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~20% slower
    loss_type: Literal["stablemax", "softmax"] = "stablemax"
    # "autocast": the states y, z and the residual stream in the autocast dtype (bf16 on GPU), as the official
    # TRM's forward_dtype; "float32": only the matmuls autocast. Without autocast both are the same.
    stream_dtype: Literal["float32", "autocast"] = "autocast"
    # AMRPA memory across the recursion (mixer=attention; athena/models/trm/attention_memory.py): each layer's attention
    # at an application of the shared net remembers the patterns it attended with at its amrpa_window previous
    # applications in this supervision step. 0: off (SDPA). The other AMRPA knobs keep AMRPAConfig's defaults.
    amrpa_window: int = Field(default=0, ge=0)
    amrpa_decay: float = Field(default=_AMRPA.memory_decay, gt=0, le=1)  # weight gamma**distance (in applications)
    amrpa_gate_init_strength: float = Field(default=_AMRPA.gate_init_strength, ge=0, le=1)  # 0: starts as without
    amrpa_alpha_mlp_hidden: int = Field(default=_AMRPA.alpha_mlp_hidden, gt=0)  # width of the selection MLP
    # Capacity routing of each block's channel FFN (athena/models/trm/routing.py): the share of positions per
    # sequence and application that run it; 1.0 = dense, no routers. z-loss weight as ST-MoE; entropy optional.
    ffn_capacity: float = Field(default=1.0, gt=0, le=1)
    router_z_loss_weight: float = Field(default=1e-3, ge=0)
    router_entropy_weight: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _shapes_fit(self) -> TRMConfig:
        if self.mixer == "attention":
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            if (self.hidden_size // self.num_heads) % 2:
                raise ValueError(f"head size hidden_size/num_heads = {self.hidden_size // self.num_heads} must be "
                                 "even (rotary embeddings rotate pairs)")
        if self.amrpa_window and self.mixer != "attention":
            raise ValueError(f"amrpa_window={self.amrpa_window} needs mixer=attention (mixer={self.mixer} has no "
                             "attention pattern to remember); set amrpa_window=0 or mixer=attention")
        if self.amrpa_window and self.gradient_checkpointing:
            raise ValueError("amrpa_window does not work with gradient_checkpointing (the recomputed attention would "
                             "be remembered twice); turn one off")
        if self.puzzle_emb_len and self.puzzle_table_dim > self.puzzle_emb_len * self.hidden_size:
            raise ValueError(f"puzzle_emb_dim {self.puzzle_table_dim} is more than puzzle_emb_len * hidden_size = "
                             f"{self.puzzle_emb_len * self.hidden_size}")
        return self

    @property
    def puzzle_table_dim(self) -> int:
        """Learned values per puzzle identifier (puzzle_emb_dim, or hidden_size when unset)."""
        return self.hidden_size if self.puzzle_emb_dim is None else self.puzzle_emb_dim
