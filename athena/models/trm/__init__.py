"""The Tiny Recursive Model: config (the one schema), layers, recursion with ACT halting, losses, puzzle
embedding, carry. Plain PyTorch, no Hydra.

Names are imported on first use (PEP 562), so reading the config schema (athena.models.trm.config) does not
import torch: a bad config stops before that second of start-up.
"""

import importlib

_EXPORTS = {
    "TinyRecursiveModel": "athena.models.trm.model", "TRMConfig": "athena.models.trm.config",
    "SupervisionCarry": "athena.models.trm.carry", "SupervisionOutput": "athena.models.trm.carry",
    "carry_to_state": "athena.models.trm.carry", "carry_from_state": "athena.models.trm.carry",
    "PuzzleEmbedding": "athena.models.trm.puzzle_embedding", "deep_supervision_loss": "athena.models.trm.losses",
    "stablemax_cross_entropy": "athena.models.trm.losses", "softmax_cross_entropy": "athena.models.trm.losses",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
