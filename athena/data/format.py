"""The on-disk puzzle dataset format (TRM-compatible), its writer and its checked loader (the batch sampler is
athena.data.sampler).

<root>/<split>/dataset.json + all__{inputs,labels,puzzle_identifiers,puzzle_indices,group_indices}.npy
    inputs, labels      (num_examples, seq_len) tokens, uint8 where the vocab allows, else int32
    puzzle_identifiers  (num_puzzles,) int32
    puzzle_indices      (num_puzzles + 1,) int64: examples of puzzle p are [puzzle_indices[p], puzzle_indices[p+1])
    group_indices       (num_groups + 1,) int64: puzzles of group g are [group_indices[g], group_indices[g+1])
<root>/identifiers.json: identifier names, index 0 = "<blank>".

Opening a split (PuzzleDataset, open_split) checks it cheaply: every file there and whole, the arrays consistent
with each other and with dataset.json, a sample of tokens inside the vocabulary; a failed check is one
DatasetError line naming the file and the fix.

A group is one original puzzle with all its augmentations. Training draws one puzzle per group per epoch,
so augmentations add variety without inflating the epoch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydantic
import torch

from athena.errors import AthenaError

ARRAY_NAMES = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
SETS = ("all",)


class DatasetError(AthenaError, ValueError):
    """Missing or malformed data, or a build spec that cannot be met; the message says how to fix it."""


class DamagedDatasetError(DatasetError):
    """A split whose files are missing, truncated, or disagree with each other or with dataset.json."""

    def __init__(self, root: Path, path: Path, problem: str):
        self.root, self.path, self.problem = Path(root), Path(path), problem
        super().__init__(f"damaged dataset: {path} {problem}; {rebuild_hint(self.root)}")


def rebuild_hint(root: Path) -> str:
    """How to get a good copy: a cache that ensure_dataset built (it has build.json) is rebuilt by deleting it."""
    if (root / "build.json").is_file():
        return f"delete {root} and run again to rebuild it"
    return "rebuild it with the tool that made it, or point data.dir at a complete dataset"


class DatasetMetadata(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    seq_len: int = pydantic.Field(gt=0)
    vocab_size: int = pydantic.Field(gt=0)
    pad_id: int = 0
    ignore_label_id: int | None = 0
    blank_identifier_id: int = 0
    num_puzzle_identifiers: int = pydantic.Field(gt=0)
    total_groups: int
    mean_puzzle_examples: float
    total_puzzles: int | None = None  # optional: TRM's newer dataset.json files carry it
    sets: list[str] = ["all"]


# ----------------------------------------------------------------------------------------------------- writing

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8) if vocab_size <= 256 else np.dtype(np.int32)


def write_split(root: str | Path, split: str, arrays: dict[str, np.ndarray],
                metadata: DatasetMetadata | dict) -> DatasetMetadata:
    """Write one split. `metadata` may leave out the fields derived from the arrays
    (total_groups, mean_puzzle_examples, total_puzzles); given ones must agree with the arrays."""
    assert set(arrays) == set(ARRAY_NAMES), f"arrays must be exactly {ARRAY_NAMES}, got {sorted(arrays)}"
    inputs, labels = np.asarray(arrays["inputs"]), np.asarray(arrays["labels"])
    puzzle_identifiers = np.asarray(arrays["puzzle_identifiers"])
    puzzle_indices = np.asarray(arrays["puzzle_indices"], dtype=np.int64)
    group_indices = np.asarray(arrays["group_indices"], dtype=np.int64)
    num_examples, num_puzzles = len(inputs), len(puzzle_identifiers)

    meta = dict(metadata) if isinstance(metadata, dict) else metadata.model_dump()
    derived = {"total_groups": len(group_indices) - 1, "total_puzzles": num_puzzles,
               "mean_puzzle_examples": num_examples / max(num_puzzles, 1)}
    for key, value in derived.items():
        if meta.get(key) is not None:
            assert abs(meta[key] - value) < 1e-6, f"metadata.{key}={meta[key]} but the arrays give {value}"
        meta[key] = value
    meta = DatasetMetadata(**meta)

    assert inputs.ndim == 2 and inputs.shape == labels.shape, f"inputs {inputs.shape} vs labels {labels.shape}"
    assert inputs.shape[1] == meta.seq_len, f"seq_len {meta.seq_len} but inputs are {inputs.shape}"
    for name, tokens in (("inputs", inputs), ("labels", labels)):
        if name == "labels" and meta.ignore_label_id is not None:  # e.g. -100 on an SFT prompt
            tokens = tokens[tokens != meta.ignore_label_id]
        assert tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < meta.vocab_size), \
            f"{name} tokens outside [0, {meta.vocab_size})"
    assert labels.size == 0 or labels.min() >= 0 or token_dtype(meta.vocab_size).kind == "i", \
        f"negative labels need a vocabulary over 256 (int32 storage), got vocab_size {meta.vocab_size}"
    assert puzzle_identifiers.ndim == 1 and (num_puzzles == 0 or (
        puzzle_identifiers.min() >= 0 and puzzle_identifiers.max() < meta.num_puzzle_identifiers)), \
        "puzzle_identifiers outside [0, num_puzzle_identifiers)"
    assert puzzle_indices.shape == (num_puzzles + 1,) and puzzle_indices[0] == 0 \
        and puzzle_indices[-1] == num_examples and np.all(np.diff(puzzle_indices) > 0), \
        "puzzle_indices must run 0 .. num_examples, every puzzle with at least one example"
    assert group_indices.ndim == 1 and group_indices[0] == 0 and group_indices[-1] == num_puzzles \
        and np.all(np.diff(group_indices) > 0), \
        "group_indices must run 0 .. num_puzzles, every group with at least one puzzle"

    out = Path(root) / split
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(meta.vocab_size)
    np.save(out / "all__inputs.npy", inputs.astype(dtype, copy=False))
    np.save(out / "all__labels.npy", labels.astype(dtype, copy=False))
    np.save(out / "all__puzzle_identifiers.npy", puzzle_identifiers.astype(np.int32, copy=False))
    np.save(out / "all__puzzle_indices.npy", puzzle_indices)
    np.save(out / "all__group_indices.npy", group_indices)
    (out / "dataset.json").write_text(meta.model_dump_json(indent=2))
    return meta


def write_identifiers(root: str | Path, names: list[str]) -> None:
    assert names and names[0] == "<blank>", "identifier 0 must be '<blank>'"
    Path(root).mkdir(parents=True, exist_ok=True)
    (Path(root) / "identifiers.json").write_text(json.dumps(names))


def one_example_per_puzzle(inputs: np.ndarray, labels: np.ndarray, group_sizes: np.ndarray) -> dict[str, np.ndarray]:
    """Arrays for datasets where every puzzle is one example with identifier 0 (Sudoku, mazes):
    `group_sizes[g]` consecutive puzzles form group g (an original and its augmentations)."""
    n = len(inputs)
    assert int(np.sum(group_sizes)) == n
    return {
        "inputs": inputs, "labels": labels,
        "puzzle_identifiers": np.zeros(n, dtype=np.int32),
        "puzzle_indices": np.arange(n + 1, dtype=np.int64),
        "group_indices": np.concatenate([[0], np.cumsum(group_sizes)]).astype(np.int64),
    }


# ----------------------------------------------------------------------------------------------------- checking

TOKEN_SAMPLE_ROWS = 1024  # rows of inputs/labels whose tokens are checked against vocab_size at open


def _npy_header(root: Path, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a .npy file from its header, after checking the file holds all the bytes it promises."""
    if not path.is_file():
        raise DamagedDatasetError(root, path, "is missing")
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(handle)
            data_start = handle.tell()
    except ValueError as error:  # numpy's header errors are one line
        raise DamagedDatasetError(root, path, f"is not a readable .npy array ({error})") from None
    if dtype.kind not in "iu":
        raise DamagedDatasetError(root, path, f"holds {dtype} values where integers are expected")
    expected = data_start + int(np.prod(shape)) * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        what = "is truncated" if actual < expected else "has trailing bytes"
        raise DamagedDatasetError(root, path, f"{what}: {actual:,} bytes where its header {shape} {dtype} "
                                              f"needs {expected:,}")
    return shape, dtype


def _read_metadata(root: Path, path: Path) -> DatasetMetadata:
    if not path.is_file():
        raise DamagedDatasetError(root, path, "is missing")
    try:
        return DatasetMetadata.model_validate_json(path.read_bytes())
    except pydantic.ValidationError as error:
        first = error.errors()[0]  # pydantic's messages are one line each; the first says enough
        where = ".".join(map(str, first["loc"]))
        reason = f"{where}: {first['msg']}" if where else first["msg"]
        raise DamagedDatasetError(root, path, f"is not a valid dataset.json ({reason})") from None


def _check_tokens(root: Path, folder: Path, meta: DatasetMetadata, num_examples: int) -> None:
    """Tokens of evenly spaced rows lie in [0, vocab_size) (labels may also be ignore_label_id): a sample,
    since the arrays can be gigabytes; it catches a dataset.json written for another vocabulary."""
    rows = np.unique(np.linspace(0, num_examples - 1, min(num_examples, TOKEN_SAMPLE_ROWS)).astype(np.int64))
    for name in ("inputs", "labels"):
        tokens = np.asarray(np.load(folder / f"all__{name}.npy", mmap_mode="r")[rows])
        bad = (tokens < 0) | (tokens >= meta.vocab_size)
        if name == "labels" and meta.ignore_label_id is not None:
            bad &= tokens != meta.ignore_label_id
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise DamagedDatasetError(root, folder / "dataset.json",
                                      f"says vocab_size {meta.vocab_size} but all__{name}.npy holds token "
                                      f"{int(tokens[row, col])} (example {int(rows[row])})")


def open_split(root: str | Path, split: str) -> tuple[DatasetMetadata, np.ndarray, np.ndarray, np.ndarray]:
    """(metadata, puzzle_identifiers, puzzle_indices, group_indices) of <root>/<split>, after checking that
    every file is there and whole and that the arrays agree with each other and with dataset.json. Raises
    DatasetError (DamagedDatasetError for a damaged split) with one line naming the file."""
    root = Path(root)
    folder = root / split
    if not folder.is_dir() and not (root / "build.json").is_file():
        raise DatasetError(f"dataset not found at {root} (expected {folder / 'dataset.json'}): build it with "
                           f"`python -m athena.data.build <name>` or check data.dir")
    meta = _read_metadata(root, folder / "dataset.json")
    paths = {name: folder / f"all__{name}.npy" for name in ARRAY_NAMES}
    shapes = {name: _npy_header(root, path)[0] for name, path in paths.items()}

    def damaged(name: str, problem: str):
        return DamagedDatasetError(root, paths.get(name, folder / name), problem)

    inputs = shapes["inputs"]
    if len(inputs) != 2:
        raise damaged("inputs", f"has shape {inputs}; expected (examples, seq_len)")
    if shapes["labels"] != inputs:
        raise damaged("labels", f"has shape {shapes['labels']} but all__inputs.npy has {inputs}")
    if inputs[1] != meta.seq_len:
        raise damaged("dataset.json", f"says seq_len {meta.seq_len} but the examples in all__inputs.npy "
                                      f"are {inputs[1]} tokens long")
    for name in ("puzzle_identifiers", "puzzle_indices", "group_indices"):
        if len(shapes[name]) != 1:
            raise damaged(name, f"has shape {shapes[name]}; expected one dimension")

    # The index arrays are small next to the tokens and the sampler needs them in memory anyway.
    identifiers, puzzle_indices, group_indices = (np.load(paths[n]) for n in ARRAY_NAMES[2:])
    num_examples, num_puzzles = inputs[0], len(identifiers)
    if len(puzzle_indices) != num_puzzles + 1 or puzzle_indices[0] != 0 or puzzle_indices[-1] != num_examples:
        raise damaged("puzzle_indices", f"must run from 0 to {num_examples} (examples) in {num_puzzles + 1} "
                                        f"entries (puzzles + 1); it has {len(puzzle_indices)} entries "
                                        f"from {puzzle_indices[0]} to {puzzle_indices[-1]}")
    if np.any(np.diff(puzzle_indices) < 0):
        raise damaged("puzzle_indices", f"decreases at puzzle {int(np.argmax(np.diff(puzzle_indices) < 0))}")
    # Every group needs a puzzle: the sampler draws one from each.
    if len(group_indices) == 0 or group_indices[0] != 0 or group_indices[-1] != num_puzzles:
        span = f" from {group_indices[0]} to {group_indices[-1]}" if len(group_indices) else ""
        raise damaged("group_indices", f"must run from 0 to {num_puzzles} (puzzles); it has "
                                       f"{len(group_indices)} entries{span}")
    if np.any(np.diff(group_indices) <= 0):
        raise damaged("group_indices", f"must increase, each group holding a puzzle; group "
                                       f"{int(np.argmax(np.diff(group_indices) <= 0))} is empty or negative")
    if num_puzzles and (identifiers.min() < 0 or identifiers.max() >= meta.num_puzzle_identifiers):
        low, high = int(identifiers.min()), int(identifiers.max())
        raise damaged("dataset.json", f"says num_puzzle_identifiers {meta.num_puzzle_identifiers} but "
                                      f"all__puzzle_identifiers.npy holds {low}..{high}")
    # mean_puzzle_examples is not compared: nothing reads it, and it is a float other tools may round.
    counts = {"total_groups": len(group_indices) - 1, "total_puzzles": num_puzzles}
    for key, count in counts.items():
        recorded = getattr(meta, key)
        if recorded is not None and recorded != count:
            raise damaged("dataset.json", f"says {key} {recorded} but the arrays hold {count}")
    if num_examples:
        _check_tokens(root, folder, meta, num_examples)
    return meta, identifiers, puzzle_indices, group_indices


# ----------------------------------------------------------------------------------------------------- reading

class PuzzleDataset(torch.utils.data.Dataset):
    """Memory-mapped split. Index it with an index array, or with the sampler's (position, indices) tuple:

    batch = {"inputs": (B, seq_len) int64, "labels": (B, seq_len) int64 (ignore_label_id -> -100),
             "puzzle_identifiers": (B,) int64, "index": (B,) int64 example indices, ["position": int]}
    """

    def __init__(self, root: str | Path, split: str):
        self.root, self.split = Path(root), split
        # Checked here, cheaply (headers, sizes, index arrays, a sample of tokens), so that damaged data stops
        # with one line now instead of an mmap or shape error inside the first step.
        (self.metadata, self.puzzle_identifiers, self.puzzle_indices,
         self.group_indices) = open_split(self.root, split)
        # Token arrays are opened lazily so that pickling the dataset into DataLoader workers does not copy them.
        self._tokens: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def num_examples(self) -> int:
        return int(self.puzzle_indices[-1])

    @property
    def num_puzzles(self) -> int:
        return len(self.puzzle_identifiers)

    @property
    def num_groups(self) -> int:
        return len(self.group_indices) - 1

    def __len__(self) -> int:
        return self.num_examples

    def identifier_names(self) -> list[str]:
        path = self.root / "identifiers.json"
        return json.loads(path.read_text()) if path.is_file() else []

    def example_puzzle(self, indices: np.ndarray) -> np.ndarray:
        """Puzzle index of each example index."""
        return np.searchsorted(self.puzzle_indices, indices, side="right") - 1

    def puzzle_group(self, puzzles: np.ndarray) -> np.ndarray:
        """Group index of each puzzle index."""
        return np.searchsorted(self.group_indices, puzzles, side="right") - 1

    def tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels), memory-mapped."""
        if self._tokens is None:
            folder = self.root / self.split
            self._tokens = (np.load(folder / "all__inputs.npy", mmap_mode="r"),
                            np.load(folder / "all__labels.npy", mmap_mode="r"))
        return self._tokens

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tokens"] = None
        return state

    def __getitem__(self, item) -> dict:
        position = None
        if isinstance(item, tuple):
            position, item = item
        indices = np.array(item, dtype=np.int64, ndmin=1)  # a copy: torch takes ownership
        inputs, labels = self.tokens()
        batch_inputs = torch.from_numpy(inputs[indices].astype(np.int64))  # (B, seq_len)
        batch_labels = torch.from_numpy(labels[indices].astype(np.int64))  # (B, seq_len)
        if self.metadata.ignore_label_id is not None:
            batch_labels[batch_labels == self.metadata.ignore_label_id] = -100
        identifiers = self.puzzle_identifiers[self.example_puzzle(indices)].astype(np.int64)
        batch = {"inputs": batch_inputs, "labels": batch_labels,
                 "puzzle_identifiers": torch.from_numpy(identifiers), "index": torch.from_numpy(indices)}
        if position is not None:
            batch["position"] = int(position)
        return batch
