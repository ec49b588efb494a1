import functools
import itertools
import random

import numpy as np
import pytest

from athena.data.format import DatasetError

import athena.data.build
from athena.data.format import PuzzleDataset
from athena.data.sudoku_extreme import build_sudoku_extreme
from athena.data.sudoku import (BOX_SHAPES, apply_shuffle, build_sudoku, canonical_key,
                                generate_puzzle, is_valid_solution, random_shuffle, solve)

CONFIGS = [(4, False), (6, False), (9, False), (4, True), (6, True), (9, True)]

# a classic unique 9x9 puzzle and its solution
PUZZLE = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"
SOLUTION = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"


def digits(text):
    return np.array([int(c) for c in text]).reshape(9, 9)


@functools.lru_cache(maxsize=None)
def all_4x4_grids():
    """Every valid 4x4 grid, by brute force over row permutations (pruned on repeated columns)."""
    rows = list(itertools.permutations(range(1, 5)))
    grids = []

    def extend(prefix):
        if len(prefix) == 4:
            if is_valid_solution(np.array(prefix)):
                grids.append(np.array(prefix))
            return
        for row in rows:
            if all(row[c] != r[c] for r in prefix for c in range(4)):
                extend(prefix + [row])

    extend([])
    return np.stack(grids)


def test_solver_basics():
    result = solve(digits(PUZZLE))
    assert result.unique and np.array_equal(result.solutions[0], digits(SOLUTION))
    assert solve(np.zeros((4, 4), dtype=int)).num_solutions == 2
    bad = digits(PUZZLE).copy()
    bad[0, 2] = 5  # two 5s in the first row
    assert solve(bad).num_solutions == 0
    assert len(all_4x4_grids()) == 288


def test_difficulty_sanity():
    near_full = digits(SOLUTION).copy()
    near_full.reshape(-1)[[0, 40, 80]] = 0
    assert solve(near_full).guesses == 0
    assert solve(digits(PUZZLE)).guesses == 0  # an easy newspaper puzzle
    almost_empty = np.zeros((9, 9), dtype=int)
    almost_empty[0, 0] = 1
    assert solve(almost_empty).guesses > 0
    assert solve(np.zeros((9, 9), dtype=int), diagonal=True).guesses > 0


def test_generated_puzzles_unique_brute_force_4x4():
    grids = all_4x4_grids().reshape(288, 16)
    for diagonal in (False, True):
        for seed in range(15):
            puzzle, solution, _ = generate_puzzle(4, diagonal=diagonal, rng=random.Random(seed))
            valid = np.array([is_valid_solution(g, diagonal=diagonal) for g in grids])
            matches = grids[valid & np.all((puzzle == 0) | (grids == puzzle), axis=1)]
            assert len(matches) == 1 and np.array_equal(matches[0], solution)
            # minimal: every clue is needed
            for cell in np.flatnonzero(puzzle):
                fewer = puzzle.copy()
                fewer[cell] = 0
                assert solve(fewer, diagonal=diagonal).num_solutions == 2


@pytest.mark.parametrize("n,diagonal", CONFIGS)
def test_shuffles_preserve_validity(n, diagonal):
    puzzle, solution, _ = generate_puzzle(n, diagonal=diagonal, rng=random.Random(n))
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        shuffle = random_shuffle(n, diagonal=diagonal, rng=rng)
        p, s = apply_shuffle(puzzle, shuffle), apply_shuffle(solution, shuffle)
        assert is_valid_solution(s, p, diagonal=diagonal)
        assert (p != 0).sum() == (puzzle != 0).sum()
        result = solve(p, diagonal=diagonal)
        assert result.unique and np.array_equal(result.solutions[0].reshape(-1), s)
        assert canonical_key(p, diagonal=diagonal) == canonical_key(puzzle, diagonal=diagonal) or not diagonal and n == 9
        seen.add(p.tobytes())
    assert len(seen) > 10  # the shuffles really move things


def check_split(root, split, n, diagonal):
    ds = PuzzleDataset(root, split)
    assert ds.metadata.seq_len == n * n and ds.metadata.vocab_size == n + 2
    assert ds.metadata.num_puzzle_identifiers == 1 and (ds.puzzle_identifiers == 0).all()
    inputs, labels = (np.asarray(a).astype(int) - 1 for a in ds.tokens())  # tokens -> digits, blank 0
    for puzzle, solution in zip(inputs, labels):
        assert is_valid_solution(solution, puzzle, diagonal=diagonal)
        result = solve(puzzle, diagonal=diagonal)
        assert result.unique and np.array_equal(result.solutions[0].reshape(-1), solution)
    return ds, inputs


@pytest.mark.parametrize("n,diagonal", CONFIGS)
def test_build_sudoku(tmp_path, n, diagonal):
    build_sudoku(tmp_path, size=n, diagonal=diagonal, num_train=5, num_aug=2, num_test=4, seed=1)
    train, train_puzzles = check_split(tmp_path, "train", n, diagonal)
    test, test_puzzles = check_split(tmp_path, "test", n, diagonal)
    assert train.num_examples == 15 and train.num_groups == 5 and train.num_puzzles == 15
    assert test.num_examples == 4 and test.num_groups == 4
    train_keys = {canonical_key(p, diagonal=diagonal) for p in train_puzzles}
    assert not train_keys & {canonical_key(p, diagonal=diagonal) for p in test_puzzles}
    assert not {p.tobytes() for p in train_puzzles} & {p.tobytes() for p in test_puzzles}


def test_build_is_independent_of_process_count(tmp_path, monkeypatch):
    outputs = []
    for cpus in (1, 2):
        monkeypatch.setattr(athena.data.build.os, "cpu_count", lambda: cpus)
        out = build_sudoku(tmp_path / str(cpus), size=6, num_train=12, num_aug=1, num_test=6, seed=3)
        outputs.append([np.asarray(a) for split in ("train", "test") for a in PuzzleDataset(out, split).tokens()])
    assert all(np.array_equal(a, b) for a, b in zip(*outputs))


def test_min_difficulty_and_max_clues():
    for seed in range(3):
        puzzle, _, guesses = generate_puzzle(9, rng=random.Random(seed), min_difficulty=2, max_clues=26)
        assert guesses >= 2 and solve(puzzle).guesses == guesses and (puzzle > 0).sum() <= 26


def write_csv(path, rows):
    path.write_text("source,question,answer,rating\n" + "".join(f"{s},{q},{a},{r}\n" for s, q, a, r in rows))


def test_sudoku_extreme_csv(tmp_path):
    rows = []
    for seed in range(4):
        puzzle, solution, guesses = generate_puzzle(9, rng=random.Random(100 + seed))
        blank = "." if seed % 2 else "0"
        rows.append(("gen", "".join(str(d) if d else blank for d in puzzle), "".join(map(str, solution)), guesses))
    source = tmp_path / "src"
    source.mkdir()
    write_csv(source / "train.csv", rows[:3])
    write_csv(source / "test.csv", rows[3:])
    out = build_sudoku_extreme(tmp_path / "out", source_dir=source, num_aug=2)
    train, _ = check_split(out, "train", 9, False)
    test, _ = check_split(out, "test", 9, False)
    assert train.num_examples == 9 and train.num_groups == 3 and test.num_examples == 1
    subsampled = build_sudoku_extreme(tmp_path / "sub", source_dir=source, subsample=2)
    assert PuzzleDataset(subsampled, "train").num_examples == 2

    broken = tmp_path / "broken"
    broken.mkdir()
    write_csv(broken / "train.csv", [rows[0], (rows[1][0], rows[1][1][:80], rows[1][2], 0)])
    write_csv(broken / "test.csv", rows[3:])
    with pytest.raises(ValueError, match=r"train.csv:3: question must be 81"):
        build_sudoku_extreme(tmp_path / "x", source_dir=broken)
    write_csv(broken / "train.csv", [(rows[0][0], rows[0][1], rows[0][2][::-1], 0)])
    with pytest.raises(ValueError, match=r"train.csv:2: answer contradicts"):
        build_sudoku_extreme(tmp_path / "x", source_dir=broken)
    (broken / "test.csv").unlink()
    with pytest.raises(DatasetError, match="test.csv"):
        build_sudoku_extreme(tmp_path / "x", source_dir=broken)


def test_box_shapes():
    assert BOX_SHAPES == {4: (2, 2), 6: (2, 3), 9: (3, 3)}
    with pytest.raises(ValueError, match="sudoku size"):
        build_sudoku("/nonexistent", size=5)
