import random

import numpy as np
import pytest

from athena.data.dihedral import dihedral, inverse_dihedral
from athena.data.format import PuzzleDataset
from athena.data.maze import GOAL, OPEN, PATH, START, WALL, bfs, build_maze, generate_maze


def check_maze(inputs, labels, min_path_len):
    size = inputs.shape[0]
    assert set(np.unique(inputs)) <= {WALL, OPEN, START, GOAL}
    assert (inputs == START).sum() == 1 and (inputs == GOAL).sum() == 1
    changed = inputs != labels
    assert np.all(inputs[changed] == OPEN) and np.all(labels[changed] == PATH)  # only open cells become path
    start, goal = int(np.flatnonzero(inputs == START)[0]), int(np.flatnonzero(inputs == GOAL)[0])
    passable = inputs != WALL
    dist, count = bfs(passable, start)
    path_cells = int((labels == PATH).sum())
    assert dist[goal] == path_cells + 1 > min_path_len  # the labelled path is as long as the shortest path
    assert count[goal] == 1  # and the shortest path is unique
    # the path cells connect S to G on their own, so they are that unique shortest path
    on_path = (labels == PATH) | (labels == START) | (labels == GOAL)
    path_dist, _ = bfs(on_path, start)
    assert path_dist[goal] == dist[goal]
    assert np.all((labels == PATH).reshape(-1) <= (path_dist >= 0))
    assert size == inputs.shape[1]


def test_generate_maze():
    for seed in range(10):
        inputs, labels = generate_maze(10, min_path_len=12, rng=random.Random(seed))
        check_maze(inputs, labels, 12)
    inputs, labels = generate_maze(30, min_path_len=110, rng=random.Random(0))
    check_maze(inputs, labels, 110)


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
        for x, y in zip(inputs, labels):
            check_maze(x, y, 12)
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
