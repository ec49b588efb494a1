import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from athena.data.build import ensure_dataset
from athena.data.format import DatasetError, DatasetMetadata, PuzzleDataset, write_identifiers, write_split
from athena.data.sampler import PuzzleBatchSampler

REPO = Path(__file__).resolve().parents[2]


def make_dataset(root, *, uneven=True, seed=0):
    """7 groups of 1-3 puzzles with 1-4 examples each (uneven) or 2 each; example e holds tokens e % 4 + 1."""
    rng = np.random.default_rng(seed)
    group_sizes = rng.integers(1, 4, size=7)
    puzzle_sizes = rng.integers(1, 5, size=group_sizes.sum()) if uneven else np.full(group_sizes.sum(), 2)
    n = int(puzzle_sizes.sum())
    inputs = (np.arange(n)[:, None] % 4 + 1 + np.zeros((1, 6), dtype=np.int64)).astype(np.uint8)
    labels = inputs.copy()
    labels[:, 0] = 0  # ignored label
    arrays = {"inputs": inputs, "labels": labels,
              "puzzle_identifiers": np.arange(len(puzzle_sizes), dtype=np.int32) % 3,
              "puzzle_indices": np.concatenate([[0], np.cumsum(puzzle_sizes)]),
              "group_indices": np.concatenate([[0], np.cumsum(group_sizes)])}
    meta = {"seq_len": 6, "vocab_size": 5, "num_puzzle_identifiers": 3}
    for split in ("train", "test"):
        write_split(root, split, arrays, meta)
    write_identifiers(root, ["<blank>", "a", "b"])
    return arrays


def take(sampler, count):
    return [(b, idx.tolist()) for b, idx in itertools.islice(iter(sampler), count)]


def test_format_round_trip(tmp_path):
    arrays = make_dataset(tmp_path)
    ds = PuzzleDataset(tmp_path, "train")
    assert ds.metadata.total_groups == 7 and ds.metadata.total_puzzles == len(arrays["puzzle_identifiers"])
    assert len(ds) == ds.num_examples == len(arrays["inputs"])
    assert np.load(tmp_path / "train" / "all__inputs.npy").dtype == np.uint8
    assert json.loads((tmp_path / "identifiers.json").read_text())[0] == "<blank>"
    idx = np.array([3, 0, len(ds) - 1])
    batch = ds[(5, idx)]
    assert batch["position"] == 5
    for key in ("inputs", "labels", "puzzle_identifiers", "index"):
        assert batch[key].dtype == torch.int64
    assert batch["inputs"].shape == (3, 6)
    assert torch.equal(batch["inputs"], torch.from_numpy(arrays["inputs"][idx].astype(np.int64)))
    assert (batch["labels"][:, 0] == -100).all() and torch.equal(batch["labels"][:, 1:], batch["inputs"][:, 1:])
    puzzles = np.searchsorted(arrays["puzzle_indices"], idx, side="right") - 1
    assert batch["puzzle_identifiers"].tolist() == arrays["puzzle_identifiers"][puzzles].tolist()
    assert batch["index"].tolist() == idx.tolist()
    assert "position" not in ds[idx]


def test_write_split_rejects_inconsistent_arrays(tmp_path):
    arrays = make_dataset(tmp_path)
    bad = dict(arrays, labels=arrays["labels"][:-1])
    with pytest.raises(AssertionError):
        write_split(tmp_path, "bad", bad, {"seq_len": 6, "vocab_size": 5, "num_puzzle_identifiers": 3})
    with pytest.raises(AssertionError):
        write_split(tmp_path, "bad", arrays, {"seq_len": 6, "vocab_size": 4, "num_puzzle_identifiers": 3})
    with pytest.raises(Exception):
        DatasetMetadata(seq_len=1, vocab_size=2, num_puzzle_identifiers=1, total_groups=1,
                        mean_puzzle_examples=1.0, typo_field=1)


def test_missing_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset not found at .*python -m athena.data.build"):
        PuzzleDataset(tmp_path / "nope", "train")


def test_train_stream_epochs(tmp_path):
    arrays = make_dataset(tmp_path)
    ds = PuzzleDataset(tmp_path, "train")
    sampler = PuzzleBatchSampler(ds, 4, train=True, seed=3)
    epoch = sampler.epoch_examples(0)
    # one puzzle per group, each with all its examples, contiguous
    puzzles = np.searchsorted(arrays["puzzle_indices"], epoch, side="right") - 1
    groups = np.searchsorted(arrays["group_indices"], puzzles, side="right") - 1
    assert sorted(set(groups.tolist())) == list(range(7)) and len(set(puzzles.tolist())) == 7
    assert sum(arrays["puzzle_indices"][p + 1] - arrays["puzzle_indices"][p] for p in set(puzzles.tolist())) == len(epoch)
    stream = np.concatenate([sampler.epoch_examples(e) for e in range(30)])
    batches = take(sampler, 20)
    assert [b for b, _ in batches] == list(range(20))
    assert all(len(idx) == 4 for _, idx in batches)
    assert sum((idx for _, idx in batches), []) == stream[:80].tolist()  # epochs concatenated, then cut
    assert take(PuzzleBatchSampler(ds, 4, train=True, seed=3), 20) == batches  # deterministic
    assert take(PuzzleBatchSampler(ds, 4, train=True, seed=4), 20) != batches
    assert 7 <= sampler.examples_per_epoch <= len(ds)


@pytest.mark.parametrize("uneven", [True, False])
def test_resume_equals_tail(tmp_path, uneven):
    make_dataset(tmp_path, uneven=uneven)
    ds = PuzzleDataset(tmp_path, "train")
    full = take(PuzzleBatchSampler(ds, 6, train=True, seed=1), 40)
    for k in (0, 1, 7, 23):
        assert take(PuzzleBatchSampler(ds, 6, train=True, seed=1, start_batch=k), 40 - k) == full[k:]


def test_ranks_concatenate_to_global_batch(tmp_path):
    make_dataset(tmp_path)
    ds = PuzzleDataset(tmp_path, "train")
    one = take(PuzzleBatchSampler(ds, 8, train=True, seed=2), 10)
    shards = [take(PuzzleBatchSampler(ds, 8, train=True, seed=2, rank=r, world_size=2), 10) for r in range(2)]
    for b in range(10):
        assert shards[0][b][0] == shards[1][b][0] == b
        assert shards[0][b][1] + shards[1][b][1] == one[b][1]
    with pytest.raises(ValueError, match="multiple of world_size"):
        PuzzleBatchSampler(ds, 7, train=True, world_size=2)

    test = PuzzleDataset(tmp_path, "test")
    one = list(PuzzleBatchSampler(test, 4, train=False))
    assert np.concatenate([i for _, i in one]).tolist() == list(range(len(test)))  # in order, once
    assert all(len(i) == 4 for _, i in one[:-1]) and 1 <= len(one[-1][1]) <= 4
    for world in (2, 4):
        shards = [list(PuzzleBatchSampler(test, 4, train=False, rank=r, world_size=world)) for r in range(world)]
        assert all(len(s) == len(one) for s in shards)  # same number of batches on every rank
        for b in range(len(one)):
            assert np.concatenate([s[b][1] for s in shards]).tolist() == one[b][1].tolist()


def test_eval_subset(tmp_path):
    make_dataset(tmp_path)
    test = PuzzleDataset(tmp_path, "test")
    a = np.concatenate([i for _, i in PuzzleBatchSampler(test, 3, train=False, max_examples=5, seed=1)])
    b = np.concatenate([i for _, i in PuzzleBatchSampler(test, 2, train=False, max_examples=5, seed=1)])
    assert len(a) == 5 and a.tolist() == sorted(set(a.tolist())) == b.tolist()


def test_dataloader_workers_match(tmp_path):
    make_dataset(tmp_path)
    ds = PuzzleDataset(tmp_path, "train")

    def batches(workers):
        loader = DataLoader(ds, sampler=PuzzleBatchSampler(ds, 4, train=True, seed=5, start_batch=3),
                            batch_size=None, num_workers=workers)
        return list(itertools.islice(iter(loader), 12))

    serial, parallel = batches(0), batches(2)
    assert [b["position"] for b in serial] == list(range(3, 15))
    for a, b in zip(serial, parallel):
        assert a["position"] == b["position"]
        for key in ("inputs", "labels", "puzzle_identifiers", "index"):
            assert torch.equal(a[key], b[key])


def failing_builder(out_dir, **_):
    (Path(out_dir) / "train").mkdir(parents=True)
    (Path(out_dir) / "train" / "partial.npy").write_bytes(b"half")
    raise RuntimeError("killed mid-build")


def test_ensure_dataset_caches_and_rebuilds(tmp_path, capsys):
    out = tmp_path / "sudoku4"
    spec = {"_target_": "athena.data.sudoku.build_sudoku", "size": 4, "num_train": 5, "num_test": 3}
    assert ensure_dataset(out, spec) == out
    stamp = (out / "train" / "all__inputs.npy").stat().st_mtime_ns
    assert json.loads((out / "build.json").read_text()) == spec
    capsys.readouterr()
    ensure_dataset(out, dict(spec))
    assert "reusing dataset at" in capsys.readouterr().out
    assert (out / "train" / "all__inputs.npy").stat().st_mtime_ns == stamp
    ensure_dataset(out, dict(spec, num_train=6))
    assert PuzzleDataset(out, "train").num_examples == 6
    assert json.loads((out / "build.json").read_text())["num_train"] == 6

    broken = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="killed"):
        ensure_dataset(broken, {"_target_": f"{__name__}.failing_builder"})
    assert not broken.exists()
    assert not [p for p in tmp_path.iterdir() if ".building-" in p.name or ".stale-" in p.name]
    with pytest.raises(ValueError, match="cannot resolve"):
        ensure_dataset(broken, {"_target_": "athena.data.nothing.here"})


@pytest.mark.slow
def test_cli_help():
    result = subprocess.run([sys.executable, "-m", "athena.data.build", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "key=value" in result.stdout
