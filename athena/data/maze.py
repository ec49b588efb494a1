"""Maze shortest-path puzzles on a size x size grid.

Tokens: 0 pad, 1 wall '#', 2 open ' ', 3 start 'S', 4 goal 'G', 5 path 'o' (vocab 6, seq size*size).
Input: walls / open / S / G. Label: the same grid with the cells of the shortest S->G path (S and G excluded)
set to 5. The shortest path is unique and longer than `min_path_len` steps.

Construction: a perfect maze (randomized depth-first search, which makes long winding corridors) on the
lattice of even (row, col) cells, plus `loops` random wall openings so there are alternative routes; then S
and G are chosen so that the shortest path is long and unique (shortest paths counted by BFS).
"""

from __future__ import annotations

import random
from collections import deque
from pathlib import Path

import numpy as np

from athena.data.build import generate_distinct
from athena.data.dihedral import NUM_DIHEDRAL, dihedral
from athena.data.format import DatasetError, one_example_per_puzzle, write_identifiers, write_split

PAD, WALL, OPEN, START, GOAL, PATH = range(6)
CHARS = {PAD: "?", WALL: "#", OPEN: " ", START: "S", GOAL: "G", PATH: "o"}


def render(grid: np.ndarray) -> str:
    return "\n".join("".join(CHARS[int(t)] for t in row) for row in np.asarray(grid))


def bfs(open_cells: np.ndarray, source: int) -> tuple[np.ndarray, np.ndarray]:
    """(distance, number of shortest paths capped at 2) from flat cell `source` over the 4-connected open
    cells of the (size, size) bool grid; distance -1 where unreachable."""
    size = open_cells.shape[0]
    passable = open_cells.reshape(-1).tolist()
    dist = [-1] * (size * size)
    count = [0] * (size * size)
    dist[source], count[source] = 0, 1
    queue = deque([source])
    while queue:
        u = queue.popleft()
        r, c = divmod(u, size)
        du = dist[u] + 1
        for v, ok in ((u - size, r > 0), (u + size, r < size - 1), (u - 1, c > 0), (u + 1, c < size - 1)):
            if ok and passable[v]:
                if dist[v] < 0:
                    dist[v], count[v] = du, count[u]
                    queue.append(v)
                elif dist[v] == du:
                    count[v] = min(2, count[v] + count[u])
    return np.array(dist), np.array(count)


def shortest_path(open_cells: np.ndarray, start: int, goal: int) -> list[int]:
    """One shortest path start -> goal as flat cells (walks back along decreasing BFS distance)."""
    size = open_cells.shape[0]
    dist, _ = bfs(open_cells, start)
    assert dist[goal] >= 0, "goal unreachable"
    path = [goal]
    while path[-1] != start:
        u = path[-1]
        r, c = divmod(u, size)
        for v, ok in ((u - size, r > 0), (u + size, r < size - 1), (u - 1, c > 0), (u + 1, c < size - 1)):
            if ok and dist[v] == dist[u] - 1:
                path.append(v)
                break
    return path[::-1]


def _perfect_maze(size: int, rng: random.Random) -> np.ndarray:
    """(size, size) bool open cells: a spanning tree of the even lattice, carved by randomized DFS."""
    cells = (size + 1) // 2
    open_cells = np.zeros((size, size), dtype=bool)
    visited = [[False] * cells for _ in range(cells)]
    start = (rng.randrange(cells), rng.randrange(cells))
    visited[start[0]][start[1]] = True
    open_cells[2 * start[0], 2 * start[1]] = True
    stack = [start]
    while stack:
        i, j = stack[-1]
        nexts = [(a, b) for a, b in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1))
                 if 0 <= a < cells and 0 <= b < cells and not visited[a][b]]
        if not nexts:
            stack.pop()
            continue
        a, b = rng.choice(nexts)
        visited[a][b] = True
        open_cells[2 * a, 2 * b] = True
        open_cells[i + a, j + b] = True  # the wall between (2i, 2j) and (2a, 2b)
        stack.append((a, b))
    return open_cells


def generate_maze(size: int = 30, *, min_path_len: int = 110, loops: int | None = None, rng: random.Random,
                  max_tries: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels), (size, size) uint8 token grids."""
    loops = size // 2 if loops is None else loops
    for _ in range(max_tries):
        open_cells = _perfect_maze(size, rng)
        # closed walls between two lattice cells: one coordinate odd, with lattice cells on both sides of it
        walls = [(r, c) for r in range(size) for c in range(size)
                 if not open_cells[r, c] and (r % 2) != (c % 2) and (r if r % 2 else c) + 1 < size]
        for r, c in rng.sample(walls, min(loops, len(walls))):
            open_cells[r, c] = True
        # Start far away from a random cell (a long-path end), then a goal whose shortest path is long and unique.
        free = np.flatnonzero(open_cells)
        dist, _ = bfs(open_cells, int(rng.choice(free)))
        far = np.flatnonzero(dist >= dist.max() - 2)
        start = int(far[rng.randrange(len(far))])
        dist, count = bfs(open_cells, start)
        goals = np.flatnonzero((dist > min_path_len) & (count == 1))
        if len(goals) == 0:
            continue
        goal = int(goals[rng.randrange(len(goals))])
        inputs = np.where(open_cells, OPEN, WALL).astype(np.uint8).reshape(-1)
        inputs[start], inputs[goal] = START, GOAL
        labels = inputs.copy()
        labels[shortest_path(open_cells, start, goal)[1:-1]] = PATH
        return inputs.reshape(size, size), labels.reshape(size, size)
    raise DatasetError(f"no {size}x{size} maze with a unique shortest path longer than {min_path_len} "
                       f"in {max_tries} tries: lower min_path_len")


def _canonical_key(grid: np.ndarray) -> bytes:
    return min(dihedral(grid, k).tobytes() for k in range(NUM_DIHEDRAL))


def _generate_worker(args) -> tuple[tuple[np.ndarray, np.ndarray, bytes], bytes]:
    size, min_path_len, loops, seed, stream, index = args
    rng = random.Random(int(np.random.default_rng([seed, stream, index]).integers(2 ** 63)))
    inputs, labels = generate_maze(size, min_path_len=min_path_len, loops=loops, rng=rng)
    key = _canonical_key(inputs)
    return (inputs, labels, key), key


def build_maze(out_dir: str | Path, *, size: int = 30, num_train: int = 1000, num_aug: int = 0,
               num_test: int = 1000, min_path_len: int = 110, loops: int | None = None, seed: int = 0) -> Path:
    """num_train mazes, each with num_aug (<= 7) distinct dihedral copies (a group), and num_test test mazes
    that are not a dihedral copy of any train maze."""
    if not 0 <= num_aug < NUM_DIHEDRAL:
        raise DatasetError(f"maze num_aug must be in 0..{NUM_DIHEDRAL - 1} (distinct dihedral copies), got {num_aug}")
    out_dir = Path(out_dir)
    common = (size, min_path_len, loops, seed)
    train = generate_distinct(_generate_worker, lambda i: common + (0, i), num_train, desc=f"{size}x{size} maze train")
    exclude = {key for _, _, key in train}
    test = generate_distinct(_generate_worker, lambda i: common + (1, i), num_test, exclude=exclude,
                             desc=f"{size}x{size} maze test")

    inputs, labels = [], []
    for index, (maze, solved, _) in enumerate(train):
        rng = np.random.default_rng([seed, 2, index])
        for k in [0] + list(1 + rng.permutation(NUM_DIHEDRAL - 1)[:num_aug]):
            inputs.append(dihedral(maze, int(k)).reshape(-1))
            labels.append(dihedral(solved, int(k)).reshape(-1))
    metadata = {"seq_len": size * size, "vocab_size": 6, "pad_id": 0, "ignore_label_id": 0,
                "blank_identifier_id": 0, "num_puzzle_identifiers": 1, "sets": ["all"]}
    write_split(out_dir, "train", one_example_per_puzzle(np.stack(inputs), np.stack(labels),
                                                         np.full(num_train, num_aug + 1)), metadata)
    write_split(out_dir, "test", one_example_per_puzzle(np.stack([m.reshape(-1) for m, _, _ in test]),
                                                        np.stack([s.reshape(-1) for _, s, _ in test]),
                                                        np.ones(num_test, dtype=np.int64)), metadata)
    write_identifiers(out_dir, ["<blank>"])
    return out_dir
