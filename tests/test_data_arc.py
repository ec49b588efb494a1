import json

import numpy as np
import pytest

from athena.data.arc import (CANVAS, IDENTITY, TEST_OUTPUTS_FILE, ArcAugmentation, arc_pass_at_k, arc_vote,
                             build_arc, decode_grid, encode_grid, load_arc_tasks, random_augmentation)
from athena.data.dihedral import dihedral
from athena.data.format import PuzzleDataset


def test_augmentation_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(50):
        grid = rng.integers(0, 10, size=(int(rng.integers(1, 8)), int(rng.integers(1, 8)))).astype(np.uint8)
        aug = random_augmentation(rng)
        assert aug.colours[0] == 0 and sorted(aug.colours) == list(range(10))
        assert np.array_equal(aug.invert(aug.apply(grid)), grid)
        task, parsed = ArcAugmentation.parse(aug.name("abc123"))
        assert task == "abc123" and parsed == aug
        assert np.array_equal(aug.apply(grid) == 0, dihedral(grid, aug.dihedral) == 0)  # black stays black


def test_encode_decode():
    rng = np.random.default_rng(1)
    for shape in [(1, 1), (3, 5), (30, 30), (30, 2), (2, 30)]:
        grid = rng.integers(0, 10, size=shape).astype(np.uint8)
        canvas = encode_grid(grid)
        assert canvas.shape == (CANVAS, CANVAS) and np.array_equal(decode_grid(canvas.reshape(-1)), grid)
        assert ((canvas == 1).sum() > 0) == (shape != (30, 30))
    shifted = encode_grid(np.ones((2, 3), dtype=np.uint8), 4, 7)
    assert (shifted[4:6, 7:10] == 3).all() and (shifted[6, 7:11] == 1).all() and (shifted[4:7, 10] == 1).all()
    assert decode_grid(np.zeros(900, dtype=np.uint8)) is None
    broken = encode_grid(np.full((3, 3), 4, dtype=np.uint8))
    broken[1, 1] = 0
    assert decode_grid(broken) is None


@pytest.fixture(scope="module")
def arc_root(tmp_path_factory):
    return build_arc(tmp_path_factory.mktemp("arc"), version=1, num_aug=3, max_tasks=3, seed=0)


def test_build_arc_layout(arc_root):
    training, evaluation = load_arc_tasks(1)
    train, test = PuzzleDataset(arc_root, "train"), PuzzleDataset(arc_root, "test")
    names = train.identifier_names()
    assert train.metadata.vocab_size == 12 and train.metadata.seq_len == 900
    assert train.metadata.num_puzzle_identifiers == len(names) == 1 + 6 * 4  # 6 tasks x (original + 3)
    assert len(set(train.puzzle_identifiers.tolist())) == train.num_puzzles == 24 and train.num_groups == 6
    assert set(test.puzzle_identifiers.tolist()) <= set(train.puzzle_identifiers.tolist())
    first_train, first_eval = sorted(training)[0], sorted(evaluation)[0]
    pairs = training[first_train]["train"] + training[first_train]["test"]
    assert train.puzzle_indices[1] == len(pairs)  # training tasks: all pairs
    # the first puzzle is the un-augmented task, pairs placed somewhere on the canvas
    inputs, labels = (np.asarray(a) for a in train.tokens())
    for row, (grid_in, grid_out) in enumerate(pairs):
        for tokens, grid in ((inputs[row], grid_in), (labels[row], grid_out)):
            canvas = tokens.reshape(30, 30)
            rows, cols = np.nonzero(canvas >= 2)
            assert np.array_equal(canvas[rows.min():rows.max() + 1, cols.min():cols.max() + 1] - 2, grid)
    # test split: eval-task test pairs, top-left, in every augmentation
    assert test.num_examples == 4 * sum(len(evaluation[t]["test"]) for t in sorted(evaluation)[:3])
    test_inputs, test_labels = (np.asarray(a) for a in test.tokens())
    for i in range(test.num_examples):
        puzzle = test.example_puzzle(np.array([i]))[0]
        task, aug = ArcAugmentation.parse(names[test.puzzle_identifiers[puzzle]])
        j = i - test.puzzle_indices[puzzle]
        grid_in, grid_out = evaluation[task]["test"][j]
        assert np.array_equal(aug.invert(decode_grid(test_inputs[i])), grid_in)
        assert np.array_equal(aug.invert(decode_grid(test_labels[i])), grid_out)
    assert names[test.puzzle_identifiers[0]] == IDENTITY.name(first_eval)
    targets = json.loads((arc_root / TEST_OUTPUTS_FILE).read_text())
    assert sorted(targets) == sorted(evaluation)[:3]


def test_voting(arc_root):
    test = PuzzleDataset(arc_root, "test")
    labels = np.asarray(test.tokens()[1])
    names = test.identifier_names()
    assert arc_pass_at_k(arc_root, labels) == {"pass@1": 1.0, "pass@2": 1.0, "num_tasks": 3}
    noise = np.random.default_rng(0).integers(0, 12, size=labels.shape)
    assert arc_pass_at_k(arc_root, noise)["pass@2"] == 0.0

    # per test input (4 augmented copies): 2 copies vote for a wrong grid W, 1 for the truth, 1 is garbage
    predictions = noise.copy()
    copies = {}
    for i in range(test.num_examples):
        puzzle = test.example_puzzle(np.array([i]))[0]
        task, aug = ArcAugmentation.parse(names[test.puzzle_identifiers[puzzle]])
        copies.setdefault((task, i - test.puzzle_indices[puzzle]), []).append((i, aug))
    for (task, j), members in copies.items():
        assert len(members) == 4
        for rank, (i, aug) in enumerate(members):
            truth = aug.invert(decode_grid(labels[i]))
            if rank < 2:  # the same wrong grid, seen through this copy's augmentation
                predictions[i] = encode_grid(aug.apply((truth + 1) % 10)).reshape(-1)
            elif rank == 2:
                predictions[i] = labels[i]
    result = arc_pass_at_k(arc_root, predictions)
    assert result["pass@1"] == 0.0 and result["pass@2"] == 1.0
    ranked = arc_vote(arc_root, predictions)
    assert all(scores[0][1] == 2 and scores[1][1] == 1 for scores in ranked.values())

    # confidence weighting: the truth's copy is very sure, the wrong ones are not
    q = np.full(len(labels), -8.0)
    for members in copies.values():
        q[members[2][0]] = 8.0
    assert arc_pass_at_k(arc_root, predictions, q_halt=q, weight_by_confidence=True)["pass@1"] == 1.0
    # a subset of examples: only the tasks it touches are scored
    subset = np.arange(4)
    partial = arc_pass_at_k(arc_root, labels[subset], example_indices=subset)
    assert partial["num_tasks"] == 1 and partial["pass@1"] > 0


def test_arc_versions():
    training, evaluation = load_arc_tasks(2)
    assert len(training) == 1000 and len(evaluation) == 120
    training, evaluation = load_arc_tasks(1)
    assert len(training) == 400 and len(evaluation) == 400
    with pytest.raises(ValueError, match="version"):
        load_arc_tasks(3)
