"""Maze data. Uniqueness of the shortest path and the labels are checked by a counter that shares no code with
athena.data.maze (which promises them with its own BFS): grids are decoded from the token arrays by the documented
token table, and shortest paths are counted exactly (no cap), for all grids at once with array shifts."""

import random

import numpy as np
import pytest
import yaml

from athena.data.dihedral import dihedral, inverse_dihedral
from athena.data.format import PuzzleDataset
from athena.data.maze import build_maze, generate_maze
from helpers import CONF

DOC_WALL, DOC_OPEN, DOC_START, DOC_GOAL, DOC_PATH = 1, 2, 3, 4, 5  # the token table in the maze module docstring
MAZE_SAMPLE = 64  # distinct mazes of the shipped config: half train (each in all its dihedral copies), half test


def count_shortest_paths(passable: np.ndarray, source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance, number of shortest paths) from the one `source` cell of each (N, H, W) grid to every cell over
    4-connected passable cells, as far as the farthest grid's one `target` cell; distance -1 where not reached.
    Frontier k holds the number of shortest paths to each cell at distance k; the cells it reaches first at step
    k + 1 sum the counts of their neighbours."""
    dist = np.where(source, 0, -1)
    count = source.astype(np.int64)
    frontier, k = count.copy(), 0
    while frontier.any() and (dist[target] < 0).any():
        k += 1
        assert frontier.max() < 2 ** 60  # so the sum of four stays exact in int64
        padded = np.pad(frontier, ((0, 0), (1, 1), (1, 1)))
        arriving = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
        new = passable & (dist < 0) & (arriving > 0)
        dist[new], count[new] = k, arriving[new]
        frontier = np.where(new, arriving, 0)
    return dist, count


def check_unique_labelled_shortest_paths(inputs: np.ndarray, labels: np.ndarray, min_path_len: int) -> None:
    """inputs, labels: (N, H, W) token grids."""
    assert set(np.unique(inputs).tolist()) <= {DOC_WALL, DOC_OPEN, DOC_START, DOC_GOAL}
    start, goal = inputs == DOC_START, inputs == DOC_GOAL
    assert (start.sum(axis=(1, 2)) == 1).all() and (goal.sum(axis=(1, 2)) == 1).all()
    passable = inputs != DOC_WALL
    from_start, paths = count_shortest_paths(passable, start, goal)
    from_goal, _ = count_shortest_paths(passable, goal, start)
    length = from_start[goal]  # (N,) steps of the shortest path S -> G
    assert (length > min_path_len).all(), f"shortest paths of {length.min()} steps; config asks > {min_path_len}"
    several = np.flatnonzero(paths[goal] != 1)
    assert len(several) == 0, f"{len(several)} of {len(inputs)} grids have several shortest paths, e.g. {several[:5]}"
    # the one shortest path is the set of cells c with dist(S, c) + dist(c, G) == length
    on_path = (from_start >= 0) & (from_goal >= 0) & (from_start + from_goal == length[:, None, None])
    assert (on_path.sum(axis=(1, 2)) == length + 1).all()
    labelled = labels == DOC_PATH
    assert np.array_equal(labelled | start | goal, on_path)
    assert np.array_equal(np.where(labelled, DOC_OPEN, labels), inputs)  # nothing else changed


def test_path_counter_on_grids_counted_by_hand():
    open_grid = np.ones((1, 3, 4), dtype=bool)  # corner to corner: choose which 2 of the 5 steps go down
    source, target = np.zeros_like(open_grid), np.zeros_like(open_grid)
    source[0, 0, 0], target[0, 2, 3] = True, True
    dist, count = count_shortest_paths(open_grid, source, target)
    assert dist[0, 2, 3] == 5 and count[0, 2, 3] == 10 and count[0, 1, 1] == 2
    ring = open_grid.copy()
    ring[0, 1, 1:3] = False  # a wall in the middle: over the top or under the bottom
    dist, count = count_shortest_paths(ring, source, target)
    assert dist[0, 2, 3] == 5 and count[0, 2, 3] == 2
    ring[0, 0, 2] = False  # the top closed: one way left
    dist, count = count_shortest_paths(ring, source, target)
    assert dist[0, 2, 3] == 5 and count[0, 2, 3] == 1


def test_generate_maze():
    small = [generate_maze(10, min_path_len=12, rng=random.Random(seed)) for seed in range(10)]
    check_unique_labelled_shortest_paths(np.stack([x for x, _ in small]), np.stack([y for _, y in small]), 12)
    inputs, labels = generate_maze(30, min_path_len=110, rng=random.Random(0))
    check_unique_labelled_shortest_paths(inputs[None], labels[None], 110)


def test_dihedral_round_trip():
    grid = np.arange(12).reshape(3, 4)
    images = {dihedral(grid, k).tobytes() + bytes(dihedral(grid, k).shape) for k in range(8)}
    assert len(images) == 8
    for k in range(8):
        assert np.array_equal(inverse_dihedral(dihedral(grid, k), k), grid)


def test_build_maze(tmp_path):
    build_maze(tmp_path, size=10, num_train=8, num_aug=3, num_test=5, min_path_len=12, seed=0)
    train, test = PuzzleDataset(tmp_path, "train"), PuzzleDataset(tmp_path, "test")
    assert train.metadata.vocab_size == 6 and train.metadata.seq_len == 100
    assert train.num_examples == 32 and train.num_groups == 8 and test.num_examples == 5
    for ds in (train, test):
        inputs, labels = (np.asarray(a).reshape(-1, 10, 10) for a in ds.tokens())
        check_unique_labelled_shortest_paths(inputs, labels, 12)
    inputs = np.asarray(train.tokens()[0]).reshape(-1, 10, 10)
    for g in range(train.num_groups):  # a group = a maze and distinct dihedral copies of it
        members = inputs[train.group_indices[g]:train.group_indices[g + 1]]
        variants = {dihedral(members[0], k).tobytes() for k in range(8)}
        assert all(m.tobytes() in variants for m in members) and len({m.tobytes() for m in members}) == 4
    train_variants = {dihedral(x, k).tobytes() for x in inputs for k in range(8)}
    test_inputs = np.asarray(test.tokens()[0]).reshape(-1, 10, 10)
    assert not train_variants & {x.tobytes() for x in test_inputs}
    with pytest.raises(ValueError, match="num_aug"):
        build_maze(tmp_path / "x", size=10, num_aug=8)


def test_every_maze_has_one_shortest_path_and_it_is_labelled(tmp_path):
    """Uniqueness and labels by the independent counter, on MAZE_SAMPLE mazes built with the shipped config's
    parameters (fewer of them) and read back from the dataset's token arrays."""
    spec = yaml.safe_load((CONF / "data" / "maze.yaml").read_text())["build"]
    assert spec.pop("_target_") == "athena.data.maze.build_maze"
    cfg = dict(spec, num_train=MAZE_SAMPLE // 2, num_test=MAZE_SAMPLE // 2)
    build_maze(tmp_path, **cfg)
    grids = 0
    for split in ("train", "test"):
        inputs, labels = (np.asarray(a).reshape(-1, cfg["size"], cfg["size"])
                          for a in PuzzleDataset(tmp_path, split).tokens())
        check_unique_labelled_shortest_paths(inputs, labels, cfg["min_path_len"])
        grids += len(inputs)
    assert grids == MAZE_SAMPLE // 2 * (cfg["num_aug"] + 2)
