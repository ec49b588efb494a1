"""Unusable checkpoints stop with one clear line (no traceback) and leave the run folder's results as they were:
damaged files, files holding code, checkpoints of another arch or task, through resume=, init_from= and evaluate.py.
A run folder given as resume= is accepted."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch

from helpers import fingerprint, last_line_error, run_script

pytestmark = pytest.mark.slow  # end-to-end runs in subprocesses

SMOKE = ("experiment=smoke",)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_root):
    run_dir = tmp_path_factory.mktemp("finished")
    run_script("pretrain.py", *SMOKE, f"hydra.run.dir={run_dir}", data_root=data_root)
    return run_dir


class Pickled:  # a class the weights-only loader must refuse to rebuild
    pass


def _bad_file(kind: str, good: bytes, path) -> None:
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 3])
    elif kind == "random_bytes":
        path.write_bytes(os.urandom(len(good)))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "code_objects":
        torch.save({"model": Pickled()}, path)
    elif kind == "plain_pickle":
        path.write_bytes(pickle.dumps({"model": {"w": [1.0, 2.0]}}))


@pytest.mark.parametrize("kind,expected", [
    ("truncated", "is truncated or damaged"),
    ("random_bytes", "is not a PyTorch checkpoint"),
    ("empty", "is empty (0 bytes)"),
    ("code_objects", "contains Python objects (test_bad_checkpoints.Pickled), not only tensors: refused for safety"),
    ("plain_pickle", "is a plain pickle, not a torch.save zip archive: refused for safety"),
])
def test_damaged_or_unsafe_resume_file_is_one_line(kind, expected, finished_run, tmp_path, data_root):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = fingerprint(run_dir)
    bad = tmp_path / f"{kind}.pt"
    _bad_file(kind, (finished_run / "checkpoints" / "last.pt").read_bytes(), bad)
    proc = run_script("pretrain.py", *SMOKE, f"hydra.run.dir={run_dir}", f"resume={bad}", data_root=data_root,
                      check=False, full_errors=False)
    last = last_line_error(proc)
    assert last.startswith(f"error: checkpoint {bad} {expected}"), last
    assert "weights_only=False" not in proc.stdout + proc.stderr  # never point users at the unsafe load
    assert fingerprint(run_dir) == before


def test_checkpoint_of_another_config_is_refused_for_resume(finished_run, tmp_path, data_root):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = fingerprint(run_dir)
    good = finished_run / "checkpoints" / "last.pt"
    proc = run_script("pretrain.py", *SMOKE, "arch.hidden_size=64", f"hydra.run.dir={run_dir}", f"resume={good}",
                      data_root=data_root, check=False, full_errors=False)
    assert "was trained with a different config (arch.hidden_size" in last_line_error(proc)
    assert fingerprint(run_dir) == before


def test_init_from_a_checkpoint_of_another_arch_is_one_line(finished_run, tmp_path, data_root):
    proc = run_script("pretrain.py", *SMOKE, "arch.hidden_size=64", f"hydra.run.dir={tmp_path / 'run'}",
                      f"init_from={finished_run}/checkpoints/last.pt", data_root=data_root, check=False,
                      full_errors=False)
    last = last_line_error(proc)
    assert "does not fit this model" in last and "tensor(s) of another shape" in last, last
    assert "trained with arch.hidden_size=32, this run 64" in last, last


def test_resume_from_a_bare_state_dict_of_another_arch_is_one_line(finished_run, tmp_path, data_root):
    weights = tmp_path / "weights.pt"
    torch.save(torch.load(finished_run / "checkpoints" / "last.pt", weights_only=True)["model"], weights)
    proc = run_script("pretrain.py", *SMOKE, "arch.hidden_size=64", f"hydra.run.dir={tmp_path / 'run'}",
                      f"resume={weights}", data_root=data_root, check=False, full_errors=False)
    last = last_line_error(proc)
    assert last.startswith(f"error: resume={weights} (a bare state dict) does not fit this model"), last


def test_evaluate_on_a_task_of_another_shape_is_one_line(finished_run, data_root):
    before = fingerprint(finished_run)
    proc = run_script("evaluate.py", f"checkpoint={finished_run}/checkpoints/last.pt", "data=sudoku6",
                      data_root=data_root, check=False, full_errors=False)
    last = last_line_error(proc)
    assert "(trained on data=sudoku4), evaluated on data=sudoku6 (vocab 8, seq_len 36" in last, last
    assert "does not fit this model" in last
    assert fingerprint(finished_run) == before


def test_resume_accepts_a_run_folder(finished_run, tmp_path, data_root):
    """resume=<run folder> continues from the folder's newest checkpoint (here last.pt = step 20)."""
    run_script("pretrain.py", *SMOKE, "train.steps=25", "train.eval_every=null", f"hydra.run.dir={tmp_path}",
               f"resume={finished_run}", data_root=data_root)
    log = (tmp_path / "pretrain.log").read_text()
    assert f"resumed from {finished_run}/checkpoints/last.pt at step 20" in log
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] == 25


def test_resume_from_a_folder_without_checkpoints_is_one_line(tmp_path, data_root):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    proc = run_script("pretrain.py", *SMOKE, f"hydra.run.dir={tmp_path / 'run'}", f"resume={empty}",
                      data_root=data_root, check=False, full_errors=False)
    assert f"{empty} is a folder without a readable checkpoint" in last_line_error(proc)
