"""Full-state checkpoints: plain containers of tensors, written atomically, loadable with
`torch.load(weights_only=True)` (no pickled classes).

Layout in a run folder: checkpoints/step_N.pt (the newest K kept) and checkpoints/last.pt.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from athena.errors import AthenaError

FORMAT = "athena-checkpoint-v1"
_STEP_FILE = re.compile(r"step_(\d+)\.pt$")


class CheckpointError(AthenaError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(state: dict[str, Any], directory: Path, step: int, keep: int) -> Path:
    """Save step_<step>.pt, point last.pt at it, and drop step files beyond the newest `keep`."""
    directory = Path(directory)
    step_path = directory / f"step_{step}.pt"
    atomic_save({"format": FORMAT, **state}, step_path)
    # last.pt is a hard link to the same bytes: no second write, and still replaced atomically.
    tmp_link = directory / f".last.pt.tmp-{os.getpid()}"
    if tmp_link.exists():
        tmp_link.unlink()
    os.link(step_path, tmp_link)
    os.replace(tmp_link, directory / "last.pt")
    _fsync_dir(directory)
    for old in sorted(step_files(directory))[:-keep]:
        old[1].unlink(missing_ok=True)
    return step_path


def step_files(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in Path(directory).glob("step_*.pt"):
        match = _STEP_FILE.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint; raise CheckpointError naming the file if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, random bytes, pickled classes, ...
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): {reason}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    if state.get("format") != FORMAT:
        # A bare model state_dict (e.g. weights saved by another tool): usable as weights only.
        if state and all(isinstance(v, torch.Tensor) for v in state.values()):
            return {"format": "weights-only", "model": state}
        raise CheckpointError(f"checkpoint {path} is not an Athena checkpoint (no '{FORMAT}' marker)")
    return state


def find_resume_checkpoint(directory: Path) -> Path | None:
    """The newest readable checkpoint in `directory` (last.pt, else step files newest first)."""
    directory = Path(directory)
    candidates = [directory / "last.pt"] + [p for _, p in reversed(step_files(directory))]
    for path in candidates:
        if not path.is_file():
            continue
        try:
            load_checkpoint(path)
            return path
        except CheckpointError as error:
            print(f"[athena] skipping {error}")
    return None


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU + every CUDA device) RNG states as tensors and plain lists."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
