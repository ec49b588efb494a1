"""Cross-task memory: a fixed budget of stored samples of earlier tasks, mixed into the batches of a new task.

    buffer = RehearsalBuffer(budget=1000, policy="task_balanced", replay_ratio=0.25, seed=0)
    buffer.add(batch_of_task_a, task=0)        # any dict of tensors with a leading batch dimension
    buffer.add(batch_of_task_b, task=1)
    batch = buffer.mix(batch_of_task_c)        # a quarter of its rows are now stored samples of tasks 0 and 1

Samples are rows of dict-of-tensor batches: puzzle batches (inputs, labels, puzzle_identifiers) and text or SFT rows
(inputs, labels -100 on the prompt) alike. Policies (which samples the buffer keeps once it is full):
- reservoir: each sample added so far is held with the same probability budget / seen (Vitter's algorithm R), so
  tasks are held in proportion to how many of their samples were added; replay draws uniformly from the buffer.
- task_balanced: every task gets an equal share; a sample of a task below its share evicts a random sample of the
  largest task, one of a task at its share replaces a random one of its own with probability share / seen (a
  reservoir per task). Replay splits each batch's replayed rows evenly over the tasks.

Rows of another length than the batch's (SFT tasks built with different sft_seq_len) are cut to the batch's length
when what is cut holds no labelled position (labels -100: right padding), else the whole batch is right-padded to
the longer row (`pad_values`; labels with -100, so the added positions carry no loss).

state_dict() holds the samples, the per-task counts and the random stream: a buffer restored from it continues
exactly (a run saves it in its checkpoints through the rehearsal callback).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from athena.errors import AthenaError
from athena.memory.rehearsal_config import RehearsalKnobs
from athena.schema import describe

IGNORE_INDEX = -100


class RehearsalError(AthenaError, ValueError):
    """A bad knob, a batch that does not fit the stored samples, or a state from another buffer."""


class RehearsalBuffer:
    def __init__(self, budget: int = RehearsalKnobs.model_fields["budget"].default, *,
                 policy: str = RehearsalKnobs.model_fields["policy"].default,
                 replay_ratio: float = RehearsalKnobs.model_fields["replay_ratio"].default,
                 seed: int = RehearsalKnobs.model_fields["seed"].default,
                 pad_values: dict[str, int] | None = None):
        try:
            knobs = RehearsalKnobs(budget=budget, policy=policy, replay_ratio=replay_ratio, seed=seed)
        except ValidationError as error:
            raise RehearsalError(f"RehearsalBuffer: {describe(error)}") from None
        self.budget, self.policy, self.replay_ratio, self.seed = (knobs.budget, knobs.policy, knobs.replay_ratio,
                                                                  knobs.seed)
        self.pad_values = {"labels": IGNORE_INDEX, **(pad_values or {})}  # other keys pad with 0
        self.rng = np.random.default_rng(seed)
        self._rows: list[dict[str, torch.Tensor]] = []  # slot -> one sample (CPU tensors, no batch dimension)
        self._task_of: list[int] = []  # slot -> its task
        self._slots: dict[int, list[int]] = {}  # task -> its slots
        self._seen: dict[int, int] = {}  # task -> samples offered to the buffer
        self.last_sources: torch.Tensor | None = None  # mix(): per row, the task it was replayed from, -1 = new

    # ------------------------------------------------------------------------------------------------ contents
    def __len__(self) -> int:
        return len(self._rows)

    @property
    def tasks(self) -> list[int]:
        return sorted(t for t, slots in self._slots.items() if slots)

    def task_counts(self) -> dict[int, int]:
        return {t: len(self._slots[t]) for t in self.tasks}

    def seen(self) -> dict[int, int]:
        return dict(self._seen)

    # ------------------------------------------------------------------------------------------------ storing
    def add(self, batch: dict[str, torch.Tensor], task: int, rng: np.random.Generator | None = None) -> None:
        """Offer every row of `batch` (of task `task`) to the buffer; the policy decides which it keeps."""
        rng = rng or self.rng
        size = _batch_size(batch)
        cpu = {k: v.detach().cpu() for k, v in batch.items()}
        self._slots.setdefault(task, [])
        for i in range(size):
            self._seen[task] = self._seen.get(task, 0) + 1
            self._offer({k: v[i].clone() for k, v in cpu.items()}, task, rng)

    def _offer(self, row: dict[str, torch.Tensor], task: int, rng: np.random.Generator) -> None:
        if len(self._rows) < self.budget:
            self._put(len(self._rows), row, task)
            return
        if self.policy == "reservoir":
            j = int(rng.integers(sum(self._seen.values())))
            if j < self.budget:
                self._put(j, row, task)
            return
        mine = len(self._slots[task])
        largest = max(self._slots, key=lambda t: (len(self._slots[t]), t))
        if mine < len(self._slots[largest]):  # below its share: take a random slot of the largest task
            self._put(self._slots[largest][int(rng.integers(len(self._slots[largest])))], row, task)
            return
        j = int(rng.integers(self._seen[task]))  # at its share: a reservoir within the task
        if j < mine:
            self._put(self._slots[task][j], row, task)

    def _put(self, slot: int, row: dict[str, torch.Tensor], task: int) -> None:
        if slot == len(self._rows):
            self._rows.append(row)
            self._task_of.append(task)
        else:
            old = self._task_of[slot]
            if old != task:
                slots = self._slots[old]
                at = slots.index(slot)
                slots[at] = slots[-1]
                slots.pop()
            self._rows[slot] = row
            self._task_of[slot] = task
            if old == task:
                return
        self._slots.setdefault(task, []).append(slot)

    # ------------------------------------------------------------------------------------------------ replaying
    def replay_count(self, batch_size: int, rng: np.random.Generator | None = None) -> int:
        """Rows of a batch of `batch_size` to replace: replay_ratio x batch_size, the fraction rounded at random so
        the mean over batches is exact."""
        if not self._rows:
            return 0
        rng = rng or self.rng
        exact = self.replay_ratio * batch_size
        return min(batch_size, int(exact) + int(rng.random() < exact - int(exact)))

    def sample(self, n: int, rng: np.random.Generator | None = None) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
        """n stored samples (rows) and their tasks: uniform over the buffer (reservoir) or evenly over the tasks
        (task_balanced); without replacement where the buffer (or the task) holds enough."""
        rng = rng or self.rng
        if n == 0 or not self._rows:
            return [], []
        if self.policy == "reservoir":
            slots = rng.choice(len(self._rows), size=n, replace=n > len(self._rows)).tolist()
        else:
            tasks = self.tasks
            per_task = np.full(len(tasks), n // len(tasks))
            per_task[rng.permutation(len(tasks))[: n % len(tasks)]] += 1  # the remainder to random tasks
            slots = []
            for task, count in zip(tasks, per_task.tolist()):
                own = self._slots[task]
                slots += [own[i] for i in rng.choice(len(own), size=count, replace=count > len(own)).tolist()]
        return [self._rows[s] for s in slots], [self._task_of[s] for s in slots]

    def mix(self, batch: dict[str, torch.Tensor], rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
        """`batch` with replay_count of its rows (at random positions) replaced by stored samples; the batch size is
        kept. self.last_sources: each row's task, -1 for the batch's own rows."""
        rng = rng or self.rng
        size = _batch_size(batch)
        n = self.replay_count(size, rng)
        sources = torch.full((size,), -1, dtype=torch.long)
        if n == 0:
            self.last_sources = sources
            return batch
        rows, tasks = self.sample(n, rng)
        missing = set(batch) - set(rows[0])
        if missing:
            raise RehearsalError(f"the batch has keys the stored samples lack ({sorted(missing)}): store samples of "
                                 "the same format (puzzle or text batches)")
        positions = torch.as_tensor(np.sort(rng.choice(size, size=n, replace=False)), dtype=torch.long)
        length = max([_length(batch)] + [_needed_length(row) for row in rows]) if _length(batch) else 0
        out = {}
        for key, value in batch.items():
            stored = torch.stack([_fit(row[key], length, self.pad_values.get(key, 0)) for row in rows])
            value = _fit(value, length, self.pad_values.get(key, 0)) if value.dim() == 2 else value.clone()
            value[positions] = stored.to(value.dtype)
            out[key] = value
        sources[positions] = torch.as_tensor(tasks, dtype=torch.long)
        self.last_sources = sources
        return out

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        keys = sorted(self._rows[0]) if self._rows else []
        return {"budget": self.budget, "policy": self.policy, "replay_ratio": self.replay_ratio,
                "rows": {k: [row[k] for row in self._rows] for k in keys},
                "task_of": torch.tensor(self._task_of, dtype=torch.long),
                "slots": {str(t): torch.tensor(slots, dtype=torch.long) for t, slots in self._slots.items()},
                "seen": {str(t): n for t, n in self._seen.items()}, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["budget"] != self.budget or state["policy"] != self.policy:
            raise RehearsalError(f"the saved rehearsal buffer has budget {state['budget']} and policy "
                                 f"{state['policy']}, this one {self.budget} and {self.policy}: use the same")
        task_of = state["task_of"].tolist()
        keys = list(state["rows"])
        self._rows = [{k: state["rows"][k][i] for k in keys} for i in range(len(task_of))]
        self._task_of = task_of
        self._seen = {int(t): int(n) for t, n in state["seen"].items()}
        self._slots = {int(t): slots.tolist() for t, slots in state["slots"].items()}  # in order: draws index them
        self.rng.bit_generator.state = state["rng"]


def _batch_size(batch: dict[str, torch.Tensor]) -> int:
    sizes = {v.shape[0] for v in batch.values()}
    if len(sizes) != 1:
        raise RehearsalError(f"a batch is a dict of tensors with one leading batch size, got sizes {sorted(sizes)}")
    return sizes.pop()


def _length(batch: dict[str, torch.Tensor]) -> int:
    """The sequence length of a batch's (batch, length) tensors; 0 when it has none."""
    lengths = {v.shape[1] for v in batch.values() if v.dim() == 2}
    if len(lengths) > 1:
        raise RehearsalError(f"the batch's sequences have different lengths {sorted(lengths)}")
    return lengths.pop() if lengths else 0


def _needed_length(row: dict[str, torch.Tensor]) -> int:
    """A stored row's length without its unlabelled right padding (its full length when it has no labels)."""
    labels = row.get("labels")
    if labels is None or labels.dim() != 1:
        return max((v.shape[0] for v in row.values() if v.dim() == 1), default=0)
    labelled = torch.nonzero(labels != IGNORE_INDEX)
    return int(labelled[-1]) + 1 if len(labelled) else 1


def _fit(value: torch.Tensor, length: int, pad: int) -> torch.Tensor:
    """A row (length,) or batch (B, length) cut or right-padded to `length`; other shapes unchanged."""
    if value.dim() not in (1, 2) or (value.dim() == 1 and length == 0):
        return value
    current = value.shape[-1]
    if current >= length:
        return value[..., :length].clone()
    padding = value.new_full((*value.shape[:-1], length - current), pad)
    return torch.cat([value, padding], dim=-1)
