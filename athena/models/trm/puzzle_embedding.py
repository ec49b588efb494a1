"""Per-puzzle learned embedding, prepended to the input as `puzzle_emb_len` extra tokens.

The table can be huge (one row per augmented puzzle) while a batch touches only a few rows, so the
weight gets a SPARSE gradient (nn.Embedding(sparse=True)) and is trained by SignSGD
(athena.training.optimizers.SignSGD), which only updates the rows present in the batch.
"""

import torch
import torch.nn.functional as F
from torch import nn


class PuzzleEmbedding(nn.Module):
    """identifier (B,) -> (B, puzzle_emb_len, hidden). Zero init, so a new puzzle starts as "no information".

    Each row has `dim` learned values; when dim < puzzle_emb_len * hidden the rest of the prefix is zero
    padding (official TRM: dim = hidden, so only the first prefix token is learned).
    """

    def __init__(self, num_identifiers: int, dim: int, puzzle_emb_len: int, hidden_size: int):
        super().__init__()
        self.puzzle_emb_len, self.hidden_size, self.dim = puzzle_emb_len, hidden_size, dim
        self.weight = nn.Parameter(torch.zeros(num_identifiers, dim))  # (num_identifiers, dim)

    # Inductor cannot build the sparse-gradient backward ("Cannot access storage of SparseTensorImpl" on CPU), so
    # this lookup stays eager: one graph break at the very start of the model's forward.
    @torch.compiler.disable
    def forward(self, identifiers: torch.Tensor) -> torch.Tensor:
        emb = F.embedding(identifiers, self.weight, sparse=True)  # (batch, dim)
        emb = F.pad(emb, (0, self.puzzle_emb_len * self.hidden_size - self.dim))  # (batch, len*hidden)
        return emb.view(-1, self.puzzle_emb_len, self.hidden_size)  # (batch, len, hidden)

    def extra_repr(self) -> str:
        return f"identifiers={self.weight.shape[0]}, dim={self.dim}, tokens={self.puzzle_emb_len}, sparse_grad=True"
