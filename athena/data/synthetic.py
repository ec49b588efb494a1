"""Random puzzles of any shape, for throughput benchmarks: the model's cost depends only on the shapes.

Inputs and labels are uniform random tokens (nothing to learn), one example per puzzle, identifier 0.
`python -m athena.data.build athena.data.synthetic.build_synthetic data/syn seq_len=900 vocab_size=12`
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from athena.data.format import one_example_per_puzzle, token_dtype, write_identifiers, write_split


def build_synthetic(out_dir: str | Path, *, seq_len: int = 81, vocab_size: int = 11, num_train: int = 8192,
                    num_test: int = 1024, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    dtype = token_dtype(vocab_size)
    metadata = {"seq_len": seq_len, "vocab_size": vocab_size, "pad_id": 0, "ignore_label_id": 0,
                "blank_identifier_id": 0, "num_puzzle_identifiers": 1, "sets": ["all"]}
    for split, count in (("train", num_train), ("test", num_test)):
        inputs = rng.integers(1, vocab_size, size=(count, seq_len)).astype(dtype)  # 0 is padding
        labels = rng.integers(1, vocab_size, size=(count, seq_len)).astype(dtype)
        write_split(out_dir, split, one_example_per_puzzle(inputs, labels, np.ones(count, dtype=np.int64)), metadata)
    write_identifiers(out_dir, ["<blank>"])
    return out_dir
