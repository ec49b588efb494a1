"""Export a checkpoint's weights to safetensors for sharing (no optimizer state, no pickles).

    python -m athena.training.export outputs/<run>/checkpoints/last.pt [--weights ema|raw] [--out model.safetensors]

Writes the model's state dict (with the EMA weights swapped in by default) plus the run's
config as safetensors metadata, so `safetensors.torch.load_file` gives back a plain state dict.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from athena.errors import AthenaError
from athena.checkpoint import CheckpointError, load_checkpoint, model_weights


def export_safetensors(checkpoint: str | Path, out: str | Path | None = None, weights: str = "ema") -> Path:
    """Write `out` (default: next to the checkpoint, <name>.<weights>.safetensors) and return its path."""
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    if weights == "ema" and not state.get("ema"):
        raise CheckpointError(f"{checkpoint} has no EMA weights (trained with ema_decay=null); use --weights raw")
    tensors = model_weights(state, weights)
    out = Path(out) if out else checkpoint.with_name(f"{checkpoint.stem}.{weights}.safetensors")
    # safetensors wants contiguous tensors that do not share memory
    tensors = {name: t.detach().contiguous().clone() for name, t in tensors.items()}
    metadata = {"format": "pt", "weights": weights, "step": str(state.get("step", "")),
                "config": json.dumps(state.get("config") or {})}
    save_file(tensors, str(out), metadata=metadata)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m athena.training.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--weights", default="ema", choices=["ema", "raw"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        print(f"wrote {export_safetensors(args.checkpoint, args.out, args.weights)}")
    except AthenaError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
