"""Checkpoint files: plain containers of tensors, written atomically, loaded with `torch.load(weights_only=True)`
(no pickled classes), and the model weights in them. Training writes and resumes them; evaluation and export
only read them, which is why this is not under athena/training.

Layout in a run folder: checkpoints/step_N.pt (the newest K kept) and checkpoints/last.pt.
"""

from __future__ import annotations

import errno
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
TEMP_MARK = ".tmp-"  # .<name>.tmp-<pid>: a file being written (or left behind by a kill)
# errno values that mean "the bytes do not fit": disk full, quota exceeded, file larger than `ulimit -f`.
_OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class CheckpointError(AthenaError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a kill never leaves half a file.

    A failed write (disk full, quota, file-size limit) removes its partial temp file and raises one CheckpointError
    line; whatever `path` held before is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = _WriteErrorRecorder(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as failure:
        tmp.unlink(missing_ok=True)  # a partial file would only keep the disk full
        # torch's zip writer reports a failed write as a RuntimeError ("unexpected pos"): the OSError it swallowed
        # is the one that says why.
        error = failure if isinstance(failure, OSError) else getattr(writer, "error", None)
        if error is not None and error.errno in _OUT_OF_SPACE:
            raise CheckpointError(
                f"could not write {path}: {os.strerror(error.errno)} ({path.parent}); the partial file was removed "
                "and earlier checkpoints are kept: free space (or lower train.keep_checkpoints) and continue with "
                "resume=auto") from None
        raise
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class _WriteErrorRecorder:
    """A file's write() that remembers the OSError it raised (torch.save turns it into a vaguer RuntimeError)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def save_checkpoint(state: dict[str, Any], directory: Path, step: int, keep: int) -> Path:
    """Save step_<step>.pt, point last.pt at it, and drop step files beyond the newest `keep`."""
    directory = Path(directory)
    step_path = directory / f"step_{step}.pt"
    atomic_save({"format": FORMAT, **state}, step_path)
    point_last_at(step_path)
    for old in sorted(step_files(directory))[:-keep]:
        old[1].unlink(missing_ok=True)
    return step_path


def point_last_at(step_path: Path) -> None:
    """Make <folder>/last.pt the checkpoint `step_path`: a hard link to the same bytes (no second write), replaced
    atomically."""
    directory = step_path.parent
    tmp_link = directory / f".last.pt{TEMP_MARK}{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    os.link(step_path, tmp_link)
    os.replace(tmp_link, directory / "last.pt")
    _fsync_dir(directory)


def step_files(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in Path(directory).glob("step_*.pt"):
        match = _STEP_FILE.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint; raise CheckpointError naming the file if it is missing or unusable.

    Loads with weights_only=True: a file holding pickled classes or code is refused (loading it could run
    arbitrary code), never retried unsafely. A bare state dict of tensors comes back as {"format": "weights-only"}.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, random bytes, pickled classes, ...
        raise CheckpointError(f"checkpoint {path} {_why_unreadable(path, error)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    if state.get("format") != FORMAT:
        # A bare model state_dict (e.g. weights saved by another tool): usable as weights only.
        if state and all(isinstance(v, torch.Tensor) for v in state.values()):
            return {"format": "weights-only", "model": state}
        raise CheckpointError(f"checkpoint {path} is not an Athena checkpoint (no '{FORMAT}' marker)")
    return state


def _why_unreadable(path: Path, error: Exception) -> str:
    """What the file is, in words (torch's own message is many lines and suggests the unsafe weights_only=False)."""
    with open(path, "rb") as f:
        head = f.read(4)
    text = str(error)
    if not head:
        return "is empty (0 bytes): a save was interrupted or the copy failed; use an earlier checkpoint"
    forbidden = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if forbidden:
        return (f"contains Python objects ({forbidden.group(1)}), not only tensors: refused for safety (loading it "
                "could run code); re-save it as a dict of tensors (e.g. model.state_dict())")
    if head.startswith(b"PK\x03\x04"):  # torch's zip format whose pieces do not read back
        return "is truncated or damaged (its zip archive is incomplete); use an earlier checkpoint"
    if head[:1] == b"\x80":  # a pickle stream, not torch's zip format
        return ("is a plain pickle, not a torch.save zip archive: refused for safety (unpickling can run code); "
                "re-save its tensors with torch.save")
    return "is not a PyTorch checkpoint (unrecognised bytes)"


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run folder / checkpoints folder (its newest readable checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = find_resume_checkpoint(folder)
    if found is None:
        raise CheckpointError(f"{path} is a folder without a readable checkpoint (looked for last.pt and step_N.pt "
                              f"in {folder}); pass a checkpoint file")
    return found


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete the partial .<name>.tmp-<pid> files a killed save left behind. Call only while holding the run folder's
    lock: then no other process is writing one."""
    stale = [p for p in Path(directory).glob(f".*{TEMP_MARK}*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def model_weights(state: dict[str, Any], weights: str = "ema") -> dict[str, torch.Tensor]:
    """A checkpoint's model state dict, with the EMA weights swapped in for `weights="ema"` (the weights evaluated
    and shipped); "raw" gives the trained weights as they were at the step."""
    if weights not in ("ema", "raw"):
        raise CheckpointError(f"weights must be ema or raw, got {weights!r}")
    tensors = dict(state["model"])
    if weights == "ema":
        if not state.get("ema"):
            raise CheckpointError("the checkpoint has no EMA weights (trained with ema_decay=null); use the raw weights")
        tensors.update(state["ema"])
    return tensors


def check_weights_fit(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Stop with one line naming the first differences when `weights` (a state dict) does not fit `model`: a
    checkpoint of another arch or task, instead of torch's multi-line size-mismatch report."""
    own = model.state_dict()  # under FSDP: DTensors, whose .shape is the whole tensor's
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    resized = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
               if k in weights and weights[k].shape != v.shape]
    problems = [f"{len(resized)} tensor(s) of another shape (checkpoint vs model): {', '.join(resized[:2])}"
                ] if resized else []
    if missing:
        problems.append(f"{len(missing)} missing, e.g. {missing[:2]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}")
    if problems:
        raise CheckpointError(f"{source} does not fit this model: {'; '.join(problems)}")


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """model.load_state_dict(weights), strictly, after check_weights_fit."""
    check_weights_fit(model, weights, source)
    model.load_state_dict(weights)


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
