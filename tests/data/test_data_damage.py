"""A damaged dataset stops when it is opened, with one line naming the file, what is wrong and the fix; a damaged
cache is rebuilt by ensure_dataset."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from athena.data.build import ensure_dataset
from athena.data.format import DamagedDatasetError, DatasetError, PuzzleDataset
from athena.data.sampler import PuzzleBatchSampler
from athena.data.synthetic import build_synthetic
from helpers import CONF, run_script

SYNTHETIC = {"_target_": "athena.data.synthetic.build_synthetic", "seq_len": 6, "vocab_size": 5,
             "num_train": 10, "num_test": 4}


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _resave(path: Path, change) -> None:
    np.save(path, change(np.load(path)))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])


def _garble_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(b"garbage!" + data[8:])


def _swap_groups(groups: np.ndarray) -> np.ndarray:
    groups = groups.copy()
    groups[[1, 2]] = groups[[2, 1]]
    return groups


# (file damaged, how, the words the one line must hold[, the file it names when that is another])
DAMAGE = {
    "missing_array": ("all__labels.npy", lambda p: p.unlink(), "is missing"),
    "truncated_array": ("all__inputs.npy", _truncate,
                        "is truncated: 181 bytes where its header (10, 6) uint8 needs 188"),
    "garbled_array": ("all__inputs.npy", _garble_header,
                      "is not a readable .npy array (the magic string is not correct"),
    "float_array": ("all__inputs.npy", lambda p: _resave(p, lambda a: a.astype(np.float32)),
                    "holds float32 values where integers are expected"),
    "labels_shape": ("all__labels.npy", lambda p: _resave(p, lambda a: a[:-1]),
                     "has shape (9, 6) but all__inputs.npy has (10, 6)"),
    "puzzle_indices_short": ("all__puzzle_indices.npy", lambda p: _resave(p, lambda a: a[:-1]),
                             "must run from 0 to 10 (examples) in 11 entries (puzzles + 1); "
                             "it has 10 entries from 0 to 9"),
    "group_indices_order": ("all__group_indices.npy", lambda p: _resave(p, _swap_groups),
                            "must increase, each group holding a puzzle; group 1 is empty or negative"),
    "identifier_beyond_table": ("all__puzzle_identifiers.npy", lambda p: _resave(p, lambda a: a + 3),
                                "says num_puzzle_identifiers 1 but all__puzzle_identifiers.npy holds 3..3",
                                "dataset.json"),
    "missing_json": ("dataset.json", lambda p: p.unlink(), "is missing"),
    "truncated_json": ("dataset.json", lambda p: p.write_text(p.read_text()[:40]),
                       "is not a valid dataset.json (Invalid JSON: EOF while parsing"),
    "json_field_missing": ("dataset.json", lambda p: p.write_text(json.dumps(
        {k: v for k, v in json.loads(p.read_text()).items() if k != "vocab_size"})),
        "is not a valid dataset.json (vocab_size: Field required)"),
    "json_seq_len": ("dataset.json", lambda p: _edit_json(p, seq_len=7),
                     "says seq_len 7 but the examples in all__inputs.npy are 6 tokens long"),
    "json_vocab": ("dataset.json", lambda p: _edit_json(p, vocab_size=3),
                   "says vocab_size 3 but all__inputs.npy holds token"),
    "json_groups": ("dataset.json", lambda p: _edit_json(p, total_groups=11),
                    "says total_groups 11 but the arrays hold 10"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_split_stops_at_open_with_one_line(kind, tmp_path):
    root = build_synthetic(tmp_path / "syn", **{k: v for k, v in SYNTHETIC.items() if k != "_target_"})
    PuzzleDataset(root, "train")  # whole before the damage
    name, damage, words, *named = DAMAGE[kind]
    damage(root / "train" / name)
    with pytest.raises(DamagedDatasetError) as raised:
        PuzzleDataset(root, "train")  # the constructor: before any batch is drawn
    message, named = str(raised.value), root / "train" / (named[0] if named else name)
    assert "\n" not in message
    assert message.startswith(f"damaged dataset: {named} {words}"), message
    # no build.json: not ours to rebuild
    assert message.endswith("; rebuild it with the tool that made it, or point data.dir at a complete dataset")
    assert raised.value.path == named
    PuzzleDataset(root, "test")  # the other split is untouched and opens


def test_missing_dataset_says_how_to_build_it(tmp_path):
    with pytest.raises(DatasetError, match=r"^dataset not found at .*: build it with `python -m athena.data.build"):
        PuzzleDataset(tmp_path / "nowhere", "train")


def test_empty_training_split_is_refused(tmp_path):
    root = build_synthetic(tmp_path / "syn", seq_len=6, vocab_size=5, num_train=0, num_test=2)
    train = PuzzleDataset(root, "train")
    with pytest.raises(DatasetError, match="holds no examples to train on"):
        PuzzleBatchSampler(train, 4, train=True)  # before: an endless search for a first example


def test_damaged_cache_names_the_fix_and_is_rebuilt(tmp_path, capsys):
    out = tmp_path / "syn"
    ensure_dataset(out, SYNTHETIC)
    whole = (out / "train" / "all__inputs.npy").read_bytes()
    _truncate(out / "train" / "all__inputs.npy")
    with pytest.raises(DamagedDatasetError, match=rf"is truncated: .*; delete {out} and run again to rebuild it$"):
        PuzzleDataset(out, "train")
    capsys.readouterr()
    assert ensure_dataset(out, SYNTHETIC) == out  # "run again"
    assert f"dataset at {out} is damaged ({out / 'train' / 'all__inputs.npy'} is truncated" in capsys.readouterr().out
    assert (out / "train" / "all__inputs.npy").read_bytes() == whole
    PuzzleDataset(out, "train")

    shutil.rmtree(out / "test")  # a split lost (an interrupted copy)
    ensure_dataset(out, SYNTHETIC)
    assert f"({out / 'test'} is missing): rebuilding it" in capsys.readouterr().out
    PuzzleDataset(out, "test")

    (out / "build.json").write_text('{"_target_": "athena.da')  # a garbled record: rebuild, not a traceback
    ensure_dataset(out, SYNTHETIC)
    assert "building dataset at" in capsys.readouterr().out
    assert json.loads((out / "build.json").read_text()) == SYNTHETIC


def test_leftovers_of_a_killed_build_are_removed(tmp_path):
    out = tmp_path / "syn"
    killed = tmp_path / ".syn.building-abc123"  # what a SIGKILL mid-build leaves (the finally never ran)
    (killed / "train").mkdir(parents=True)
    (killed / "train" / "all__inputs.npy").write_bytes(b"half")
    other = tmp_path / ".other.building-abc123"  # another dataset's: not ours to touch
    other.mkdir()
    ensure_dataset(out, SYNTHETIC)
    assert not killed.exists() and other.exists()


def only_train_builder(out_dir, **_):
    build_synthetic(out_dir, seq_len=4, vocab_size=3, num_train=2, num_test=1)
    shutil.rmtree(Path(out_dir) / "test")


def test_a_builder_that_writes_a_bad_dataset_is_stopped(tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(DatasetError, match=rf"^builder {__name__}.only_train_builder wrote a dataset that fails "
                                           r"its check: test is missing$"):
        ensure_dataset(out, {"_target_": f"{__name__}.only_train_builder"})
    assert not out.exists() and not list(tmp_path.glob(".bad.building-*"))


@pytest.mark.slow
def test_pretrain_on_a_damaged_dataset_stops_with_one_line(tmp_path):
    """A dataset from elsewhere (no build.json, so used as is) with a truncated array: the run ends with the
    one-line error last on stderr, before training, instead of an mmap error inside the first step."""
    spec = yaml.safe_load((CONF / "data" / "sudoku4.yaml").read_text())["build"]
    data = tmp_path / "sudoku4"
    ensure_dataset(data, spec)
    (data / "build.json").unlink()
    _truncate(data / "test" / "all__labels.npy")
    proc = run_script("pretrain.py", "experiment=smoke", f"data.dir={data}", f"hydra.run.dir={tmp_path / 'run'}",
                      data_root=tmp_path / "cache", check=False, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: damaged dataset: {data / 'test' / 'all__labels.npy'} is truncated: "), last
    assert "Traceback" not in proc.stderr and "train/lm_loss" not in proc.stdout + proc.stderr
