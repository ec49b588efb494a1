"""Shared fixtures: every test builds its data under a temp folder and runs on the CPU. Shared functions (running
the scripts, composing configs, the toy TRM) are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from athena.offline import hf_offline

hf_offline()  # before any test module imports transformers / datasets: they read HF_HUB_OFFLINE at import


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is as fast and does not stall when other processes load the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One dataset cache for the whole session (datasets are keyed by their build spec)."""
    return tmp_path_factory.mktemp("data")
