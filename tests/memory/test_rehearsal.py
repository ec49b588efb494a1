"""RehearsalBuffer (athena.memory.rehearsal): the budget holds, reservoir keeps tasks in proportion to the stream and
task_balanced keeps them equal, batches get the replay ratio, replayed rows are stored samples (puzzle and text
rows, of other lengths too), and the buffer continues exactly after a checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from athena.memory.rehearsal import RehearsalBuffer, RehearsalError

SEQ = 8


def puzzle_batch(task: int, start: int, size: int, seq: int = SEQ) -> dict[str, torch.Tensor]:
    """Rows whose content names their task and index: inputs[:, 0] = task, inputs[:, 1] = index."""
    index = torch.arange(start, start + size)
    inputs = torch.zeros(size, seq, dtype=torch.long)
    inputs[:, 0], inputs[:, 1] = task, index
    return {"inputs": inputs, "labels": inputs + 100, "puzzle_identifiers": torch.full((size,), task),
            "index": index}


def fill(buffer: RehearsalBuffer, sizes: dict[int, int], chunk: int = 50) -> None:
    for task, size in sizes.items():
        for start in range(0, size, chunk):
            buffer.add(puzzle_batch(task, start, min(chunk, size - start)), task=task)
            assert len(buffer) <= buffer.budget  # never over budget, at any point


def test_reservoir_keeps_the_budget_and_tasks_in_proportion_to_the_stream():
    shares = []
    for seed in range(5):
        buffer = RehearsalBuffer(budget=400, policy="reservoir", seed=seed)
        fill(buffer, {0: 1000, 1: 3000})
        assert len(buffer) == 400
        shares.append(buffer.task_counts()[0] / 400)
    # Each held sample is task 0 with probability 1000/4000: 400 draws have a std of sqrt(400*.25*.75)/400 = 0.022
    # per seed; the mean of 5 seeds lies within 0.04 (about 4 of its standard errors, 0.0097) of 0.25.
    assert abs(np.mean(shares) - 0.25) < 0.04, shares


def test_reservoir_holds_early_and_late_samples_alike():
    buffer = RehearsalBuffer(budget=500, policy="reservoir", seed=0)
    fill(buffer, {0: 5000})
    held = torch.stack([row["index"] for row in buffer._rows]).double()
    # Uniform over 0..4999: mean 2499.5, std of the mean of 500 about 1443/sqrt(500) = 65; 4 of them is 260.
    assert abs(held.mean().item() - 2499.5) < 260


def test_task_balanced_keeps_an_equal_share_per_task_whatever_the_stream():
    buffer = RehearsalBuffer(budget=300, policy="task_balanced", seed=0)
    fill(buffer, {0: 2000, 1: 200, 2: 700})
    counts = buffer.task_counts()
    assert sum(counts.values()) == 300 and counts == {0: 100, 1: 100, 2: 100}
    fill(buffer, {3: 1000})  # a fourth task takes its share from the others
    assert buffer.task_counts() == {0: 75, 1: 75, 2: 75, 3: 75}
    # Within a task it is a reservoir: task 0's held samples come from all of its 2000, not its first 100.
    held = [int(row["index"]) for row in buffer._rows if int(row["puzzle_identifiers"]) == 0]
    assert max(held) > 1000


@pytest.mark.parametrize("policy", ["reservoir", "task_balanced"])
def test_batches_get_the_replay_ratio_of_stored_samples(policy):
    buffer = RehearsalBuffer(budget=90, policy=policy, replay_ratio=0.25, seed=1)
    fill(buffer, {0: 300, 1: 30, 2: 90})
    replayed, per_task = 0, {0: 0, 1: 0, 2: 0}
    for step in range(400):
        batch = puzzle_batch(task=9, start=1000 * step, size=30)
        mixed = buffer.mix(batch, np.random.default_rng([1, step]))
        sources = buffer.last_sources
        n = int((sources >= 0).sum())
        assert n in (7, 8)  # 0.25 x 30 = 7.5: rounded at random, so never further than one row from it
        replayed += n
        assert mixed["inputs"].shape == (30, SEQ)  # the batch keeps its size
        own = sources < 0
        assert torch.equal(mixed["inputs"][own], batch["inputs"][own])  # the rest of the batch untouched
        for row, task in zip(mixed["inputs"][~own], sources[~own]):
            assert int(row[0]) == int(task) != 9  # a stored sample of the task it is reported as
        assert torch.equal(mixed["labels"][~own], mixed["inputs"][~own] + 100)  # rows whole: inputs with labels
        counts = torch.bincount(sources[~own], minlength=3)
        for task in per_task:
            per_task[task] += int(counts[task])
        if policy == "task_balanced":
            assert counts.max() - counts.min() <= 1  # each batch splits its replayed rows evenly over the tasks
    # 400 batches of 7.5 expected rows: the std of the total is sqrt(400 x 0.25) = 10 rows; 40 rows is 4 of them.
    assert abs(replayed - 400 * 7.5) < 40
    shares = np.array(list(per_task.values())) / replayed
    if policy == "task_balanced":
        assert np.abs(shares - 1 / 3).max() < 0.01  # even per batch, so even overall
    else:  # reservoir replays the buffer uniformly: about 300:30:90 held, replayed in that proportion (+-0.05)
        held = np.array([buffer.task_counts().get(t, 0) for t in range(3)]) / len(buffer)
        assert np.abs(shares - held).max() < 0.05


def test_text_rows_of_other_lengths_are_cut_or_the_batch_padded():
    buffer = RehearsalBuffer(budget=10, replay_ratio=0.5, seed=0)
    short = {"inputs": torch.arange(1, 5).repeat(4, 1), "labels": torch.tensor([[-100, -100, 3, 4]] * 4)}
    long = {"inputs": torch.arange(1, 13).repeat(4, 1), "labels": torch.full((4, 12), -100)}
    long["labels"][:, 2:5] = 7  # labelled up to position 4, right padding after: cut to the batch's length
    buffer.add(long, task=0)
    mixed = buffer.mix({k: v[:, :6].clone() for k, v in long.items()}, np.random.default_rng(0))
    assert mixed["inputs"].shape == (4, 6)
    # A stored row labelled further than the batch reaches: the whole batch is right-padded, labels with -100.
    long["labels"][:, 10] = 7
    buffer = RehearsalBuffer(budget=10, replay_ratio=0.5, seed=0)
    buffer.add(long, task=0)
    mixed = buffer.mix(short, np.random.default_rng(0))
    assert mixed["inputs"].shape == (4, 11)
    own = buffer.last_sources < 0
    assert torch.equal(mixed["labels"][own][:, 4:], torch.full((int(own.sum()), 7), -100))
    assert torch.equal(mixed["labels"][~own], long["labels"][~own][:, :11])


def test_the_buffer_round_trips_through_a_checkpoint_and_continues_exactly(tmp_path):
    buffer = RehearsalBuffer(budget=50, policy="task_balanced", replay_ratio=0.3, seed=4)
    fill(buffer, {0: 120, 1: 80})
    torch.save({"rehearsal": buffer.state_dict()}, tmp_path / "ckpt.pt")
    restored = RehearsalBuffer(budget=50, policy="task_balanced", replay_ratio=0.3, seed=99)  # seed: from the state
    restored.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["rehearsal"])
    assert restored.task_counts() == buffer.task_counts() and restored.seen() == buffer.seen()
    for a, b in zip(buffer._rows, restored._rows):
        assert all(torch.equal(a[k], b[k]) for k in a)
    fill(buffer, {2: 60})
    fill(restored, {2: 60})  # the same random stream: the same samples kept and evicted
    batch = puzzle_batch(9, 0, 20)
    assert torch.equal(buffer.mix(batch)["inputs"], restored.mix(batch)["inputs"])
    with pytest.raises(RehearsalError, match="budget 50 and policy task_balanced, this one 60 and task_balanced"):
        RehearsalBuffer(budget=60, policy="task_balanced").load_state_dict(buffer.state_dict())


def test_bad_knobs_are_one_line():
    with pytest.raises(RehearsalError, match=r"^RehearsalBuffer: replay_ratio: Input should be less than 1 "
                                             r"\(got 1.5\)$"):
        RehearsalBuffer(budget=10, replay_ratio=1.5)
    with pytest.raises(RehearsalError, match=r"^RehearsalBuffer: policy: Input should be 'reservoir' or "):
        RehearsalBuffer(budget=10, policy="fifo")
