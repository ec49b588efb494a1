import json

import numpy as np
import pytest

from athena.data.arc import (CANVAS, IDENTITY, TEST_OUTPUTS_FILE, ArcAugmentation, arc_pass_at_k, arc_vote,
                             build_arc, decode_grid, encode_grid, load_arc_tasks, random_augmentation)
from athena.data.dihedral import dihedral
from athena.data.format import PuzzleDataset, write_identifiers, write_split


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
    assert partial == {"pass@1": 1.0, "pass@2": 1.0, "num_tasks": 1}  # the first task's 4 copies of its 1 input


def test_arc_versions():
    training, evaluation = load_arc_tasks(2)
    assert len(training) == 1000 and len(evaluation) == 120
    training, evaluation = load_arc_tasks(1)
    assert len(training) == 400 and len(evaluation) == 400
    with pytest.raises(ValueError, match="version"):
        load_arc_tasks(3)


# ----------------------------------------------------------------------------------------------------- pass@k, exactly
# A hand-made test split in ARC's layout. Augmented grids and canvases are made here from the documented format
# (module docstrings of athena.data.arc and athena.data.dihedral), not with the module's own helpers, so a bug in
# its augmentation, its inverse, the decoding or the voting changes the scores.

def doc_augment(grid: np.ndarray, k: int, colours: str) -> np.ndarray:
    """Rotate k % 4 quarter turns counter-clockwise, transpose if k >= 4, then recolour c -> colours[c]."""
    turned = np.rot90(grid, k % 4)
    return np.array([int(c) for c in colours])[turned.T if k >= 4 else turned]


def doc_canvas(grid: np.ndarray | None) -> np.ndarray:
    """(900,) tokens: colours + 2 at the top-left, 1 on the row below and the column right of the grid; None ->
    an empty canvas (no grid to decode)."""
    canvas = np.zeros((30, 30), dtype=np.uint8)
    if grid is not None:
        h, w = grid.shape
        canvas[:h, :w] = grid + 2
        canvas[h, :w + 1] = canvas[:h + 1, w] = 1
    return canvas.reshape(-1)


# Each test input of each task appears in these 3 copies, in this order (colour 0 stays 0).
COPIES = ((0, "0123456789"), (1, "0312645978"), (6, "0987654321"))


def _grid(seed: int) -> np.ndarray:
    """A 2x3 grid with six distinct colours: no symmetry, so a wrong inverse gives another grid."""
    return np.random.default_rng(seed).permutation(np.arange(1, 10))[:6].reshape(2, 3)


T0, W0, T1, U, V, X, Y, Z = GRIDS = [_grid(s) for s in range(8)]
assert len({g.tobytes() for g in GRIDS}) == len(GRIDS)
# task -> per test input: (truth, per copy (the grid it predicts in the original frame or None, q_halt))
CASE = {
    "aaaa": [(T0, [(T0, 4.0), (W0, -4.0), (W0, -4.0)]),   # votes W0 2, T0 1: pass@1 miss, pass@2 hit
             (T1, [(T1, 0.0), (T1, 0.0), (None, 5.0)])],  # T1 2 (the undecodable copy has no vote): hit
    "bbbb": [(U, [(U, -1.0), (V, 2.0), (None, 0.0)])],    # 1-1 tie, V has the higher q: pass@1 miss, pass@2 hit
    "cccc": [(Z, [(X, 3.0), (Y, 2.0), (Z, 1.0)])],        # three 1-vote ties, the truth ranked third: miss, miss
}
# votes: task aaaa solves 1 of 2 inputs at k=1 and 2 of 2 at k=2, bbbb 0 then 1, cccc 0 and 0
PASS_BY_VOTES = {"pass@1": (1 / 2 + 0 + 0) / 3, "pass@2": (1 + 1 + 0) / 3, "num_tasks": 3}
# by confidence (sum of sigmoid(q)): T0 0.98 beats W0 2 x 0.02, V 0.88 beats U 0.27, X > Y > Z as before
PASS_BY_CONFIDENCE = {"pass@1": (1 + 0 + 0) / 3, "pass@2": (1 + 1 + 0) / 3, "num_tasks": 3}


@pytest.fixture(scope="module")
def hand_made_arc(tmp_path_factory):
    """(root, predictions (examples, 900), q_halt (examples,)) for CASE."""
    root = tmp_path_factory.mktemp("hand_arc")
    names, inputs, labels, predictions, q = ["<blank>"], [], [], [], []
    identifiers, puzzle_sizes, group_sizes = [], [], []
    for task, test_inputs in CASE.items():
        for copy, (k, colours) in enumerate(COPIES):
            names.append(f"{task}|{k}|{colours}")
            identifiers.append(len(names) - 1)
            puzzle_sizes.append(len(test_inputs))
            for truth, votes in test_inputs:
                grid, q_halt = votes[copy]
                inputs.append(doc_canvas(doc_augment(truth[::-1], k, colours)))  # any valid grid will do
                labels.append(doc_canvas(doc_augment(truth, k, colours)))
                predictions.append(doc_canvas(None if grid is None else doc_augment(grid, k, colours)))
                q.append(q_halt)
        group_sizes.append(len(COPIES))
    write_split(root, "test", {
        "inputs": np.stack(inputs), "labels": np.stack(labels),
        "puzzle_identifiers": np.array(identifiers, dtype=np.int32),
        "puzzle_indices": np.concatenate([[0], np.cumsum(puzzle_sizes)]),
        "group_indices": np.concatenate([[0], np.cumsum(group_sizes)])},
        {"seq_len": 900, "vocab_size": 12, "ignore_label_id": 0, "num_puzzle_identifiers": len(names)})
    write_identifiers(root, names)
    (root / TEST_OUTPUTS_FILE).write_text(json.dumps(
        {task: [truth.tolist() for truth, _ in test_inputs] for task, test_inputs in CASE.items()}))
    return root, np.stack(predictions), np.array(q)


def test_pass_at_k_exact_on_a_hand_made_case(hand_made_arc):
    # abs=1e-12: float means of the same fractions (1/6, 2/3); only the summation order can differ
    root, predictions, q = hand_made_arc
    assert arc_pass_at_k(root, predictions, q_halt=q) == pytest.approx(PASS_BY_VOTES, abs=1e-12)
    assert arc_pass_at_k(root, predictions, q_halt=q, weight_by_confidence=True) == pytest.approx(
        PASS_BY_CONFIDENCE, abs=1e-12)
    labels = np.asarray(PuzzleDataset(root, "test").tokens()[1])
    assert arc_pass_at_k(root, labels) == {"pass@1": 1.0, "pass@2": 1.0, "num_tasks": 3}

    # the ranked grids are the predictions mapped back to the original frame, with their votes
    ranked = arc_vote(root, predictions, q_halt=q)
    expected = {("aaaa", 0): [(W0, 2), (T0, 1)], ("aaaa", 1): [(T1, 2)], ("bbbb", 0): [(V, 1), (U, 1)],
                ("cccc", 0): [(X, 1), (Y, 1), (Z, 1)]}
    assert sorted(ranked) == sorted(expected)
    for key, candidates in expected.items():
        assert [(grid.tolist(), votes) for grid, votes in candidates] == \
               [(grid.tolist(), votes) for grid, votes in ranked[key]], key

    # any order and any subset of the examples: only the tasks present are scored
    order = np.random.default_rng(0).permutation(len(predictions))
    assert arc_pass_at_k(root, predictions[order], q_halt=q[order], example_indices=order) == pytest.approx(
        PASS_BY_VOTES, abs=1e-12)
    only_b = np.arange(6, 9)  # task bbbb's three copies (aaaa has 3 copies x 2 inputs before it)
    assert arc_pass_at_k(root, predictions[only_b], q_halt=q[only_b], example_indices=only_b) == {
        "pass@1": 0.0, "pass@2": 1.0, "num_tasks": 1}
