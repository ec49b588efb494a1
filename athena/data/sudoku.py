"""Sudoku n x n (n = 4, 6, 9; boxes 2x2, 2x3, 3x3) and Sudoku-X (both main diagonals also hold 1..n):
an exact solver, a generator of unique-solution puzzles, validity-preserving shuffles, dataset builders.

Grids are (n, n) or flat (n*n,) integer arrays of digits, 0 = blank. Tokens on disk: 0 pad, 1 blank,
2..n+1 = digits 1..n (vocab n + 2); labels are the full solution.
"""

from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from athena.data.build import generate_distinct, parallel_map
from athena.data.dihedral import dihedral
from athena.data.format import DatasetError, one_example_per_puzzle, write_identifiers, write_split

BOX_SHAPES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}  # (rows, cols) of a box


# ----------------------------------------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class Geometry:
    n: int
    diagonal: bool
    units: tuple[tuple[int, ...], ...]  # rows, cols, boxes (, the two diagonals) as flat cell indices
    peers: tuple[tuple[int, ...], ...]  # cells sharing a unit with each cell


@functools.lru_cache(maxsize=None)
def geometry(n: int, diagonal: bool = False) -> Geometry:
    if n not in BOX_SHAPES:
        raise DatasetError(f"sudoku size must be one of {sorted(BOX_SHAPES)}, got {n}")
    br, bc = BOX_SHAPES[n]
    units = [tuple(r * n + c for c in range(n)) for r in range(n)]
    units += [tuple(r * n + c for r in range(n)) for c in range(n)]
    units += [tuple((r0 + r) * n + c0 + c for r in range(br) for c in range(bc))
              for r0 in range(0, n, br) for c0 in range(0, n, bc)]
    if diagonal:
        units += [tuple(i * n + i for i in range(n)), tuple(i * n + n - 1 - i for i in range(n))]
    peers = tuple(tuple(sorted({p for u in units if cell in u for p in u} - {cell})) for cell in range(n * n))
    return Geometry(n, diagonal, tuple(units), peers)


def is_valid_solution(solution: np.ndarray, puzzle: np.ndarray | None = None, *, diagonal: bool = False) -> bool:
    """Every unit holds 1..n exactly once, and the givens of `puzzle` (if any) are kept."""
    flat = np.asarray(solution).reshape(-1)
    n = int(round(len(flat) ** 0.5))
    digits = set(range(1, n + 1))
    if any({int(flat[i]) for i in unit} != digits for unit in geometry(n, diagonal).units):
        return False
    if puzzle is not None:
        given = np.asarray(puzzle).reshape(-1)
        return bool(np.all((given == 0) | (given == flat)))
    return True


# ----------------------------------------------------------------------------------------------------- solver
# Candidates are bitmasks (bit d-1 = digit d may go here). Propagation applies naked singles (a cell with one
# candidate removes it from its peers) and hidden singles (a digit with one place in a unit goes there);
# when stuck, search branches on a cell with the fewest candidates. Guesses = branching cells visited.

_POPCOUNT = [bin(i).count("1") for i in range(1 << 9)]


def _propagate(cand: list[int], queue: list[int], geo: Geometry) -> bool:
    """Propagate in place from the newly fixed cells in `queue`; False on a contradiction."""
    peers, units, full = geo.peers, geo.units, (1 << geo.n) - 1
    while True:
        while queue:
            cell = queue.pop()
            bit = cand[cell]
            for p in peers[cell]:
                c = cand[p]
                if c & bit:
                    c ^= bit
                    if c == 0:
                        return False
                    cand[p] = c
                    if c & (c - 1) == 0:
                        queue.append(p)
        for unit in units:
            once = twice = 0
            for i in unit:
                c = cand[i]
                twice |= once & c
                once |= c
            if once != full:
                return False  # some digit has no place left in this unit
            only = once & ~twice
            if only:
                for i in unit:
                    c = cand[i]
                    hidden = c & only
                    if hidden:
                        if hidden & (hidden - 1):
                            return False  # two digits that can only go in this one cell
                        if c != hidden:
                            cand[i] = hidden
                            queue.append(i)
        if not queue:
            return True


def _search(cand: list[int], geo: Geometry, limit: int, solutions: list, stats: list, rng) -> None:
    best, best_count = -1, 99
    for i, c in enumerate(cand):
        if c & (c - 1):
            k = _POPCOUNT[c]
            if k < best_count:
                best, best_count = i, k
                if k == 2:
                    break
    if best < 0:
        solutions.append(cand[:])
        return
    stats[0] += 1
    c = cand[best]
    bits = [1 << d for d in range(geo.n) if c >> d & 1]
    if rng is not None:
        rng.shuffle(bits)
    for bit in bits:
        trial = cand[:]
        trial[best] = bit
        if _propagate(trial, [best], geo):
            _search(trial, geo, limit, solutions, stats, rng)
        if len(solutions) >= limit:
            return


def _solve_cells(cells: list[int], geo: Geometry, limit: int, rng=None,
                 forbid: tuple[int, int] | None = None) -> tuple[list[list[int]], int]:
    """Solutions (as digit lists) up to `limit` and the guess count. `forbid=(cell, digit)` removes one candidate
    (used to test uniqueness: a puzzle is unique iff no solution differs from the known one at a cell)."""
    full = (1 << geo.n) - 1
    cand = [full if d == 0 else 1 << (d - 1) for d in cells]
    if forbid is not None:
        cell, digit = forbid
        cand[cell] &= ~(1 << (digit - 1))
        if cand[cell] == 0:
            return [], 0
    queue = [i for i, c in enumerate(cand) if c & (c - 1) == 0]
    solutions: list[list[int]] = []
    stats = [0]
    if _propagate(cand, queue, geo):
        _search(cand, geo, limit, solutions, stats, rng)
    return [[c.bit_length() for c in s] for s in solutions], stats[0]


@dataclass
class SolveResult:
    solutions: list[np.ndarray]  # up to `limit` solutions, each (n, n)
    guesses: int  # branching cells visited while searching (0 = solved by singles alone)

    @property
    def num_solutions(self) -> int:
        return len(self.solutions)

    @property
    def unique(self) -> bool:
        return len(self.solutions) == 1


def solve(puzzle: np.ndarray, *, diagonal: bool = False, limit: int = 2) -> SolveResult:
    """Exact solver: counts solutions up to `limit`; for limit=2 the guess count (difficulty) covers the
    whole search tree of a unique puzzle, so it does not depend on how its digits are labelled."""
    grid = np.asarray(puzzle)
    n = int(round(grid.size ** 0.5))
    assert grid.size == n * n, f"puzzle of {grid.size} cells is not square"
    solutions, guesses = _solve_cells([int(x) for x in grid.reshape(-1)], geometry(n, diagonal), limit)
    return SolveResult([np.array(s, dtype=np.int64).reshape(n, n) for s in solutions], guesses)


# ----------------------------------------------------------------------------------------------------- generator

def generate_puzzle(n: int = 9, *, diagonal: bool = False, rng: random.Random, min_difficulty: int = 0,
                    max_clues: int | None = None, max_tries: int = 10_000) -> tuple[np.ndarray, np.ndarray, int]:
    """(puzzle, solution, guesses), flat digit arrays: a random full grid with clues removed in random order
    while the solution stays unique (a minimal puzzle), retried until guesses >= min_difficulty and
    clues <= max_clues."""
    geo = geometry(n, diagonal)
    for _ in range(max_tries):
        (solution,), _ = _solve_cells([0] * (n * n), geo, limit=1, rng=rng)
        puzzle = list(solution)
        order = list(range(n * n))
        rng.shuffle(order)
        for cell in order:
            digit = puzzle[cell]
            puzzle[cell] = 0
            others, _ = _solve_cells(puzzle, geo, limit=1, forbid=(cell, digit))
            if others:
                puzzle[cell] = digit  # needed for uniqueness
        if max_clues is not None and sum(d != 0 for d in puzzle) > max_clues:
            continue
        _, guesses = _solve_cells(puzzle, geo, limit=2)
        if guesses >= min_difficulty:
            return np.array(puzzle, dtype=np.uint8), np.array(solution, dtype=np.uint8), guesses
    raise DatasetError(f"no {n}x{n} puzzle with min_difficulty={min_difficulty}, max_clues={max_clues} "
                       f"in {max_tries} tries: lower them")


# ----------------------------------------------------------------------------------------------------- shuffles
# A shuffle is (cells, digits): new_flat = digits[old_flat[cells]], digits[0] = 0 keeps blanks blank.

def _band_permutations(n: int, size: int) -> list[tuple[int, ...]]:
    """All permutations of 0..n-1 that permute bands of `size` consecutive lines and lines within bands."""
    bands = n // size
    result = []
    for band_order in itertools.permutations(range(bands)):
        for inner in itertools.product(itertools.permutations(range(size)), repeat=bands):
            result.append(tuple(band_order[b] * size + inner[b][i] for b in range(bands) for i in range(size)))
    return result


@functools.lru_cache(maxsize=None)
def symmetric_line_permutations(n: int) -> tuple[tuple[int, ...], ...]:
    """Permutations p used on rows and columns at once ((r, c) -> (p[r], p[c])) that keep Sudoku-X valid:
    p respects the row bands and the column stacks (boxes stay boxes), the same p on both axes keeps the
    main diagonal, and p commuting with the reversal r -> n-1-r keeps the anti-diagonal."""
    br, bc = BOX_SHAPES[n]
    stack_ok = set(_band_permutations(n, bc))
    return tuple(p for p in _band_permutations(n, br)
                 if p in stack_ok and all(p[n - 1 - r] == n - 1 - p[r] for r in range(n)))


def _allowed_dihedral(n: int) -> list[int]:
    br, bc = BOX_SHAPES[n]
    # With non-square boxes, quarter turns and transposes would turn 2x3 boxes into 3x2 ones.
    return list(range(8)) if br == bc else [0, 2, 4 + 1, 4 + 3]  # identity, half turn, the two axis flips


def random_shuffle(n: int, *, diagonal: bool = False, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random validity-preserving shuffle (cells (n*n,), digits (n+1,))."""
    br, bc = BOX_SHAPES[n]
    index = np.arange(n * n).reshape(n, n)
    if diagonal:
        options = symmetric_line_permutations(n)
        p = np.array(options[rng.integers(len(options))])
        index = dihedral(index[np.ix_(p, p)], int(rng.choice(_allowed_dihedral(n))))
    else:
        def lines(size):  # permute bands, then lines inside each band
            bands = rng.permutation(n // size)
            return np.concatenate([b * size + rng.permutation(size) for b in bands])
        index = index[np.ix_(lines(br), lines(bc))]
        if br == bc and rng.integers(2):
            index = index.T
    digits = np.concatenate([[0], 1 + rng.permutation(n)])
    return np.ascontiguousarray(index).reshape(-1), digits


def apply_shuffle(grid: np.ndarray, shuffle: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    cells, digits = shuffle
    flat = np.asarray(grid).reshape(-1)
    return digits[flat[cells]].astype(flat.dtype).reshape(np.shape(grid))


# ----------------------------------------------------------------------------------------------------- equivalence
# Train/test disjointness: a test puzzle must not equal a train puzzle up to the shuffles above. The canonical
# key is the lexicographically smallest digit-relabelled grid over a group of cell maps: the full shuffle group
# where it is small (4x4, 6x6, every Sudoku-X), else (plain 9x9, 3.4M maps) digit relabelling only.

@functools.lru_cache(maxsize=None)
def _equivalence_maps(n: int, diagonal: bool) -> tuple[np.ndarray, bool]:
    """(cell maps (M, n*n), whether they cover every shuffle of random_shuffle)."""
    br, bc = BOX_SHAPES[n]
    index = np.arange(n * n).reshape(n, n)
    maps = []
    if diagonal:
        for p in symmetric_line_permutations(n):
            for k in _allowed_dihedral(n):
                maps.append(dihedral(index[np.ix_(p, p)], k).reshape(-1))
        complete = True
    elif n in (4, 6):
        for rows in _band_permutations(n, br):
            for cols in _band_permutations(n, bc):
                g = index[np.ix_(rows, cols)]
                maps.append(g.reshape(-1))
                if br == bc:
                    maps.append(g.T.reshape(-1))
        complete = True
    else:
        maps.append(index.reshape(-1))
        complete = False
    return np.unique(np.stack(maps), axis=0), complete


def _relabel(grids: np.ndarray, n: int) -> np.ndarray:
    """Rename digits in order of first appearance, row by row of `grids` (M, cells)."""
    m, cells = grids.shape
    present = grids[:, None, :] == np.arange(1, n + 1)[None, :, None]  # (M, n, cells)
    first = np.where(present.any(-1), present.argmax(-1), cells)  # (M, n) first position of each digit
    rank = np.argsort(np.argsort(first, axis=1, kind="stable"), axis=1)  # (M, n) order of appearance
    table = np.concatenate([np.zeros((m, 1), dtype=np.int64), rank + 1], axis=1)  # (M, n+1) old -> new digit
    return np.take_along_axis(table, grids.astype(np.int64), axis=1)


def canonical_key(puzzle: np.ndarray, *, diagonal: bool = False) -> bytes:
    flat = np.asarray(puzzle).reshape(-1)
    n = int(round(len(flat) ** 0.5))
    maps, _ = _equivalence_maps(n, diagonal)
    variants = _relabel(flat[maps], n)  # (M, cells)
    for col in range(variants.shape[1]):  # lexicographic minimum: narrow down column by column
        column = variants[:, col]
        variants = variants[column == column.min()]
        if len(variants) == 1:
            break
    return variants[0].astype(np.uint8).tobytes()


# ----------------------------------------------------------------------------------------------------- builders

def _generate_worker(args) -> tuple[tuple[np.ndarray, np.ndarray, int, bytes], bytes]:
    n, diagonal, min_difficulty, max_clues, seed, stream, index = args
    py_seed = int(np.random.default_rng([seed, stream, index]).integers(2 ** 63))
    puzzle, solution, guesses = generate_puzzle(n, diagonal=diagonal, rng=random.Random(py_seed),
                                                min_difficulty=min_difficulty, max_clues=max_clues)
    key = canonical_key(puzzle, diagonal=diagonal)
    return (puzzle, solution, guesses, key), key


def augment_worker(args) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """The original and `num_aug` shuffled copies of one puzzle, plus (where the canonical key does not
    already cover shuffles) the keys of the copies."""
    puzzle, solution, num_aug, diagonal, seed, index, need_keys = args
    n = int(round(len(puzzle) ** 0.5))
    rng = np.random.default_rng([seed, 2, index])
    puzzles, solutions = [puzzle], [solution]
    for _ in range(num_aug):
        shuffle = random_shuffle(n, diagonal=diagonal, rng=rng)
        puzzles.append(apply_shuffle(puzzle, shuffle))
        solutions.append(apply_shuffle(solution, shuffle))
    puzzles, solutions = np.stack(puzzles), np.stack(solutions)
    keys = [r.astype(np.uint8).tobytes() for r in _relabel(puzzles, n)] if need_keys else []
    return puzzles, solutions, keys


def write_sudoku_split(out_dir: Path, split: str, puzzles: np.ndarray, solutions: np.ndarray,
                        group_sizes: np.ndarray, n: int, difficulty: np.ndarray | None = None) -> None:
    # digits -> tokens: blank 0 -> 1, digit d -> d + 1
    inputs = (puzzles.reshape(len(puzzles), n * n) + 1).astype(np.uint8)
    labels = (solutions.reshape(len(solutions), n * n) + 1).astype(np.uint8)
    write_split(out_dir, split, one_example_per_puzzle(inputs, labels, group_sizes),
                {"seq_len": n * n, "vocab_size": n + 2, "pad_id": 0, "ignore_label_id": 0,
                 "blank_identifier_id": 0, "num_puzzle_identifiers": 1, "sets": ["all"]})
    if difficulty is not None:  # guesses the solver needed, per example; handy for accuracy-by-difficulty
        np.save(out_dir / split / "difficulty.npy", difficulty.astype(np.int32))


def build_sudoku(out_dir: str | Path, *, size: int = 9, diagonal: bool = False, num_train: int = 1000,
                 num_aug: int = 0, num_test: int = 1000, min_difficulty: int = 0, max_clues: int | None = None,
                 seed: int = 0) -> Path:
    """Generated Sudoku (TRM recipe): num_train puzzles, each stored with num_aug shuffled copies (a group; every
    copy its own puzzle of one example), and num_test test puzzles not shuffle-equivalent to any train puzzle."""
    out_dir = Path(out_dir)
    geometry(size, diagonal)  # validates size
    _, keys_cover_shuffles = _equivalence_maps(size, diagonal)
    common = (size, diagonal, min_difficulty, max_clues, seed)
    name = f"{size}x{size} sudoku{'-X' if diagonal else ''}"

    train = generate_distinct(_generate_worker, lambda i: common + (0, i), num_train, desc=f"{name} train")
    exclude = {key for _, _, _, key in train}
    augmented = parallel_map(augment_worker, [(p, s, num_aug, diagonal, seed, i, not keys_cover_shuffles)
                                               for i, (p, s, _, _) in enumerate(train)], desc=f"{name} augment")
    for _, _, keys in augmented:
        exclude.update(keys)
    test = generate_distinct(_generate_worker, lambda i: common + (1, i), num_test, exclude=exclude,
                             desc=f"{name} test")

    train_guesses = np.repeat([g for _, _, g, _ in train], num_aug + 1)
    write_sudoku_split(out_dir, "train", np.concatenate([a[0] for a in augmented]),
                        np.concatenate([a[1] for a in augmented]), np.full(num_train, num_aug + 1), size,
                        train_guesses)
    write_sudoku_split(out_dir, "test", np.stack([t[0] for t in test]), np.stack([t[1] for t in test]),
                        np.ones(num_test, dtype=np.int64), size, np.array([t[2] for t in test]))
    write_identifiers(out_dir, ["<blank>"])
    return out_dir
