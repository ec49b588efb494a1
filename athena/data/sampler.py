"""Which examples each optimizer step (and each process under torchrun) reads: the batch sampler of a puzzle split."""

from __future__ import annotations

import numpy as np

from athena.data.format import DatasetError, PuzzleDataset

class PuzzleBatchSampler:
    """Yields (batch_number, local example indices); hand it to
    DataLoader(dataset, sampler=sampler, batch_size=None, ...).

    train=True: an infinite stream of global batches of exactly `batch_size`. Epoch e is a function of
      (seed, e) only: shuffle the groups, pick one random puzzle per group, take all its examples. Epochs are
      concatenated and cut into batches (a batch may span two epochs); rank r gets slice r of each batch.
      `start_batch=k` resumes exactly at global batch k.
    train=False: one ordered pass over the split (or a fixed seeded subset of `max_examples`), batches of
      `batch_size` with a smaller last one; each global batch is split across ranks (np.array_split), so
      every rank yields the same number of batches and a rank's part of the last one may be small or empty.
    """

    def __init__(self, dataset: PuzzleDataset, batch_size: int, *, train: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, max_examples: int | None = None, start_batch: int = 0):
        if train and dataset.num_examples == 0:  # the stream would look for a first example forever
            raise DatasetError(f"{dataset.root / dataset.split} holds no examples to train on; rebuild it with some")
        if batch_size <= 0 or batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be a positive multiple of world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.puzzle_indices = np.asarray(dataset.puzzle_indices, dtype=np.int64)
        self.group_indices = np.asarray(dataset.group_indices, dtype=np.int64)
        puzzle_sizes = np.diff(self.puzzle_indices)

        if train:
            # Expected epoch size: each group contributes the mean size of its puzzles.
            group_of_puzzle = np.repeat(np.arange(len(self.group_indices) - 1), np.diff(self.group_indices))
            group_puzzles = np.diff(self.group_indices)
            self.examples_per_epoch = float(np.sum(puzzle_sizes / group_puzzles[group_of_puzzle]))
            # When every puzzle has the same number of examples, every epoch has the same size.
            self._fixed_epoch_size = (int(puzzle_sizes[0]) * (len(self.group_indices) - 1)
                                      if len(puzzle_sizes) and puzzle_sizes.min() == puzzle_sizes.max() else None)
        else:
            n = int(self.puzzle_indices[-1])
            if max_examples is not None and max_examples < n:
                rng = np.random.default_rng([seed, 1234567])
                self.eval_indices = np.sort(rng.choice(n, size=max_examples, replace=False)).astype(np.int64)
            else:
                self.eval_indices = np.arange(n, dtype=np.int64)
            self.examples_per_epoch = float(len(self.eval_indices))

    # ---- training stream
    def _epoch_puzzles(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        groups = rng.permutation(len(self.group_indices) - 1)
        first = self.group_indices[groups]
        count = self.group_indices[groups + 1] - first
        return first + np.minimum((rng.random(len(groups)) * count).astype(np.int64), count - 1)

    def epoch_examples(self, epoch: int) -> np.ndarray:
        """Example indices of training epoch `epoch`, in stream order."""
        puzzles = self._epoch_puzzles(epoch)
        starts = self.puzzle_indices[puzzles]
        sizes = self.puzzle_indices[puzzles + 1] - starts
        # Concatenated ranges [start, start + size) without a Python loop.
        return np.repeat(starts - (np.cumsum(sizes) - sizes), sizes) + np.arange(int(sizes.sum()))

    def _epoch_size(self, epoch: int) -> int:
        if self._fixed_epoch_size is not None:
            return self._fixed_epoch_size
        puzzles = self._epoch_puzzles(epoch)
        return int(np.sum(self.puzzle_indices[puzzles + 1] - self.puzzle_indices[puzzles]))

    def _locate(self, position: int) -> tuple[int, int]:
        """(epoch, offset inside it) of stream position `position`, by arithmetic over epoch sizes."""
        if self._fixed_epoch_size is not None:
            return divmod(position, self._fixed_epoch_size)
        epoch = 0
        while position >= (size := self._epoch_size(epoch)):
            position -= size
            epoch += 1
        return epoch, position

    def _train_stream(self):
        B, local = self.batch_size, self.batch_size // self.world_size
        epoch, offset = self._locate(self.start_batch * B)
        buffer = self.epoch_examples(epoch)[offset:]
        batch_number = self.start_batch
        while True:
            while len(buffer) < B:
                epoch += 1
                buffer = np.concatenate([buffer, self.epoch_examples(epoch)])
            batch, buffer = buffer[:B], buffer[B:]
            yield batch_number, batch[self.rank * local:(self.rank + 1) * local]
            batch_number += 1

    # ---- evaluation pass
    def eval_batch(self, batch_number: int) -> np.ndarray:
        """This rank's example indices of evaluation batch `batch_number`."""
        batch = self.eval_indices[batch_number * self.batch_size:(batch_number + 1) * self.batch_size]
        return np.array_split(batch, self.world_size)[self.rank]

    def __len__(self) -> int:
        if self.train:
            raise TypeError("the training sampler is an infinite stream and has no length")
        return -(-len(self.eval_indices) // self.batch_size)

    def __iter__(self):
        if self.train:
            return self._train_stream()
        return ((b, self.eval_batch(b)) for b in range(self.start_batch, len(self)))
