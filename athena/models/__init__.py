"""TRM model, its layers and losses. Plain PyTorch (no Hydra here)."""

from athena.models.losses import deep_supervision_loss, softmax_cross_entropy, stablemax_cross_entropy
from athena.models.puzzle_embedding import PuzzleEmbedding
from athena.models.trm import SupervisionCarry, SupervisionOutput, TinyRecursiveModel

__all__ = [
    "TinyRecursiveModel",
    "SupervisionCarry",
    "SupervisionOutput",
    "PuzzleEmbedding",
    "deep_supervision_loss",
    "stablemax_cross_entropy",
    "softmax_cross_entropy",
]
