"""Checkpoints are atomic, plain (weights_only loadable), pruned, and fail loudly when damaged."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from athena.checkpoint import (
    CheckpointError, find_resume_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state, step_files,
)


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "step": step, "rng": rng_state(), "config": {"a": 1}}


def test_save_keeps_last_k_and_last_points_to_newest(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(_state(step), tmp_path, step, keep=2)
    assert [s for s, _ in step_files(tmp_path)] == [30, 40]
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["step"] == 40 and torch.equal(last["model"]["w"], torch.full((3,), 40.0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left behind"


@pytest.mark.parametrize("damage", ["truncate", "random_bytes", "empty"])
def test_damaged_checkpoint_is_named_in_one_line(tmp_path, damage):
    path = save_checkpoint(_state(1), tmp_path, 1, keep=3)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "random_bytes": os.urandom(4096), "empty": b""}[damage])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_resume_falls_back_past_a_corrupt_last(tmp_path):
    save_checkpoint(_state(1), tmp_path, 1, keep=3)
    save_checkpoint(_state(2), tmp_path, 2, keep=3)
    (tmp_path / "last.pt").unlink()  # last.pt and step_2.pt share bytes: damage both via a new file
    (tmp_path / "last.pt").write_bytes(b"garbage")
    (tmp_path / "step_2.pt").write_bytes(b"garbage")
    found = find_resume_checkpoint(tmp_path)
    assert found == tmp_path / "step_1.pt"


def test_bare_state_dict_loads_as_weights_only(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.pt")
    state = load_checkpoint(tmp_path / "weights.pt")
    assert state["format"] == "weights-only" and torch.equal(state["model"]["w"], torch.ones(2))


def test_rng_state_round_trips_through_a_file(tmp_path):
    save_checkpoint({"rng": rng_state()}, tmp_path, 0, keep=1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "last.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
