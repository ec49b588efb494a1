"""The public Sudoku-Extreme layout (a folder with train.csv and test.csv of `source,question,answer,rating`), for
users who have the files: read, checked line by line, optionally subsampled and augmented, written as a dataset."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from athena.data.build import parallel_map
from athena.data.format import DatasetError, write_identifiers
from athena.data.sudoku import augment_worker, write_sudoku_split

CSV_HEADER = ["source", "question", "answer", "rating"]


def read_sudoku_csv(csv_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(puzzles, solutions) as (N, 81) uint8 digits from a `source,question,answer,rating` CSV
    (question: '.' or '0' for blanks). Raises ValueError naming the first bad line."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"sudoku CSV not found: {csv_path}")
    table = np.full(256, 255, dtype=np.uint8)
    table[[ord(c) for c in "0123456789"]] = np.arange(10)
    table[ord(".")] = 0
    questions, answers = [], []
    with open(csv_path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != CSV_HEADER:
            raise DatasetError(f"{csv_path}:1: header must be {','.join(CSV_HEADER)}, got {header}")
        for row in tqdm(reader, desc=f"read {csv_path.name}", unit=" rows"):
            line = reader.line_num
            if len(row) != 4:
                raise DatasetError(f"{csv_path}:{line}: expected 4 fields (source,question,answer,rating), got {len(row)}")
            question, answer = row[1], row[2]
            if len(question) != 81 or not set(question) <= set(".0123456789"):
                raise DatasetError(f"{csv_path}:{line}: question must be 81 characters of 1-9, '.' or '0', got {question!r}")
            if len(answer) != 81 or not set(answer) <= set("123456789"):
                raise DatasetError(f"{csv_path}:{line}: answer must be 81 digits 1-9, got {answer!r}")
            q = table[np.frombuffer(question.encode(), dtype=np.uint8)]
            a = table[np.frombuffer(answer.encode(), dtype=np.uint8)]
            if np.any((q != 0) & (q != a)):
                raise DatasetError(f"{csv_path}:{line}: answer contradicts a given of the question")
            questions.append(q)
            answers.append(a)
    if not questions:
        raise DatasetError(f"{csv_path}: no puzzles after the header")
    return np.stack(questions), np.stack(answers)


def load_sudoku_csv(csv_path: str | Path, out_dir: str | Path, *, split: str | None = None, num_aug: int = 0,
                    subsample: int | None = None, seed: int = 0) -> Path:
    """Write one split (default: the CSV's stem, e.g. train.csv -> "train") of 9x9 puzzles from a CSV,
    optionally a seeded random subset of `subsample` puzzles, each with num_aug shuffled copies."""
    out_dir, split = Path(out_dir), split or Path(csv_path).stem
    puzzles, solutions = read_sudoku_csv(csv_path)
    if subsample is not None and subsample < len(puzzles):
        keep = np.sort(np.random.default_rng([seed, 3]).choice(len(puzzles), size=subsample, replace=False))
        puzzles, solutions = puzzles[keep], solutions[keep]
    if num_aug:
        augmented = parallel_map(augment_worker, [(p, s, num_aug, False, seed, i, False)
                                                   for i, (p, s) in enumerate(zip(puzzles, solutions))],
                                 desc=f"augment {split}")
        puzzles = np.concatenate([a[0] for a in augmented])
        solutions = np.concatenate([a[1] for a in augmented])
    group_sizes = np.full(len(puzzles) // (num_aug + 1), num_aug + 1)
    write_sudoku_split(out_dir, split, puzzles, solutions, group_sizes, 9)
    write_identifiers(out_dir, ["<blank>"])
    return out_dir


def build_sudoku_extreme(out_dir: str | Path, *, source_dir: str | Path, num_aug: int = 0,
                         subsample: int | None = None, test_subsample: int | None = None, seed: int = 0) -> Path:
    """The public Sudoku-Extreme layout: source_dir/train.csv and source_dir/test.csv (TRM: subsample=1000,
    num_aug=1000). Augmentation and `subsample` apply to train only."""
    source_dir = Path(source_dir)
    missing = [str(source_dir / f) for f in ("train.csv", "test.csv") if not (source_dir / f).is_file()]
    if missing:
        raise DatasetError(f"Sudoku-Extreme CSVs missing: {', '.join(missing)} "
                                f"(expected a folder with train.csv and test.csv)")
    load_sudoku_csv(source_dir / "train.csv", out_dir, split="train", num_aug=num_aug, subsample=subsample, seed=seed)
    load_sudoku_csv(source_dir / "test.csv", out_dir, split="test", subsample=test_subsample, seed=seed)
    return Path(out_dir)
