"""rehearsal=buffer: replay samples of earlier tasks while training on a new one (continual learning).

    python pretrain.py data=sft_wordnet_category rehearsal=buffer \
        'rehearsal.from_data=[sft_fortune_topics,sft_wordnet_gloss]' init_from=<the previous stage's checkpoint>

Before training, the callback builds (or finds in the cache) each earlier task's dataset with the same builders as
`data=`, draws `fill_per_task` examples of its train split (seeded) and offers them to a RehearsalBuffer
(athena.memory.rehearsal) as task 0, 1, ... in the order given. Before every step it replaces `replay_ratio` of
the process's batch rows with stored samples (on_batch): the batch keeps its size, so the loss, the learning rate
and throughput stay comparable with a run without rehearsal; the new task's rows that were replaced are skipped.
Which rows are replayed is drawn from (seed, step, rank): a resumed run replays the same samples. The buffer is in
every checkpoint (the callback's state). Logged: rehearsal/replayed_fraction, rehearsal/buffer_size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import OmegaConf

from athena.data.build import dataset_dir, ensure_dataset
from athena.data.format import PuzzleDataset
from athena.errors import AthenaError
from athena.memory.rehearsal import RehearsalBuffer
from athena.training.callback_base import Callback
from athena.training.rehearsal_config import DATA_CONF, is_built_dataset

if TYPE_CHECKING:
    from athena.config import RunConfig

log = logging.getLogger("athena")

FILL_CHUNK = 256  # rows read from an earlier task's split at a time


def earlier_dataset(entry: str, data_root: str) -> Path:
    """A from_data entry as a built dataset folder: a conf/data option built (or found in the cache) like `data=`,
    or a folder that holds one already."""
    if (DATA_CONF / f"{entry}.yaml").is_file():
        node = OmegaConf.to_container(OmegaConf.load(DATA_CONF / f"{entry}.yaml"), resolve=True)
        return ensure_dataset(dataset_dir(node["name"], node["build"], data_root, node.get("dir")), node["build"])
    if is_built_dataset(entry):
        return Path(entry)
    raise AthenaError(f"rehearsal.from_data: {entry!r} is neither a data option nor a built dataset folder")


class RehearsalCallback(Callback):
    name = "rehearsal"

    def __init__(self, *, from_data: list[str], data_root: str = "data", fill_per_task: int | None = None,
                 **knobs: Any):
        self.buffer = RehearsalBuffer(**knobs)
        self.from_data, self.data_root = list(from_data), data_root
        self.fill_per_task = fill_per_task or self.buffer.budget
        self.replayed = self.rows = 0  # since the last log

    def on_setup(self, trainer) -> None:
        self.rank = trainer.dist.rank
        for task, entry in enumerate(self.from_data):
            folder = earlier_dataset(entry, self.data_root)
            split = PuzzleDataset(folder, "train")
            check_fits(split, trainer, entry)
            self.fill(split, task)
        log.info("rehearsal: %d samples of %d earlier task(s) (%s), replaying %.0f%% of each batch; per task: %s",
                 len(self.buffer), len(self.from_data), ", ".join(self.from_data), 100 * self.buffer.replay_ratio,
                 self.buffer.task_counts())

    def fill(self, split: PuzzleDataset, task: int) -> None:
        """Offer `fill_per_task` random examples of `split` (all when it has fewer) to the buffer as `task`."""
        rng = np.random.default_rng([self.buffer.seed, task])
        count = min(self.fill_per_task, split.num_examples)
        indices = rng.choice(split.num_examples, size=count, replace=False)
        for start in range(0, count, FILL_CHUNK):
            self.buffer.add(split[indices[start:start + FILL_CHUNK]], task=task, rng=rng)

    def on_batch(self, trainer, step, batch):
        rng = np.random.default_rng([self.buffer.seed, step, self.rank])
        mixed = self.buffer.mix(batch, rng)
        self.replayed += int((self.buffer.last_sources >= 0).sum())
        self.rows += len(self.buffer.last_sources)
        return mixed

    def on_log(self, step, metrics):
        out = {"rehearsal/replayed_fraction": self.replayed / max(self.rows, 1),
               "rehearsal/buffer_size": float(len(self.buffer))}
        self.replayed = self.rows = 0
        return out

    def state_dict(self):
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state):
        if state:
            self.buffer.load_state_dict(state["buffer"])


def check_fits(split: PuzzleDataset, trainer, entry: str) -> None:
    """Stop (one line) when an earlier task's samples cannot go into this run's model."""
    mine, theirs = trainer.metadata, split.metadata
    if theirs.vocab_size != mine.vocab_size:
        raise AthenaError(f"rehearsal.from_data={entry}: its vocabulary ({theirs.vocab_size:,} ids) is not this run's "
                          f"({mine.vocab_size:,}): build both with the same tokenizer")
    if theirs.num_puzzle_identifiers > mine.num_puzzle_identifiers:
        raise AthenaError(f"rehearsal.from_data={entry}: its puzzle identifiers ({theirs.num_puzzle_identifiers}) do "
                          f"not fit this run's puzzle embedding ({mine.num_puzzle_identifiers})")
    fixed = getattr(trainer.model, "seq_len", None)  # a model built for one sequence length (TRM)
    if fixed is not None and theirs.seq_len != fixed:
        raise AthenaError(f"rehearsal.from_data={entry}: its sequences have {theirs.seq_len} tokens, this model takes "
                          f"exactly {fixed}")


def rehearsal_callback(cfg: RunConfig) -> Callback | None:
    """rehearsal=buffer: the callback with the config's knobs; none: no callback."""
    r = cfg.rehearsal
    if r.name == "none":
        return None
    return RehearsalCallback(from_data=r.from_data, data_root=cfg.data_root, fill_per_task=r.fill_per_task,
                             **r.buffer_knobs())

