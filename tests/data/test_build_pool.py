"""The dataset builders' process pool: its workers take the kernel's default SIGTERM (not the Python handler
pretrain.py has installed when it forks them), and they are all gone when a build returns or fails.

Why: a forked worker that inherits a Python SIGTERM handler can miss the SIGTERM that Pool.terminate() sends (it
lands between the handler check and the blocking wait on the task queue's lock), and the build then waits on it
forever. CI saw this as an ARC smoke run hanging for 300 s right after its dataset was built."""

import multiprocessing
import os
import signal

import pytest

from athena.data import build


def _dispositions(_):
    return signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)


def _keyed_dispositions(i):
    return _dispositions(i), i


def _fails_on_three(i):
    if i == 3:
        raise ValueError("item 3 is bad")
    return i


@pytest.fixture
def python_handlers(monkeypatch):
    """A pool of two processes on any machine, under Python handlers like the training loop's: in this process
    they only set a flag. In a worker that kept them they exit, so that a pool without the fix fails the
    assertions below instead of (mostly) hanging the suite."""
    monkeypatch.setattr(build, "num_processes", lambda n: min(2, n))
    owner, flags = os.getpid(), []

    def handler(signum, frame):
        if os.getpid() != owner:
            os._exit(1)
        flags.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


def test_parallel_map_workers_take_the_default_sigterm_and_ignore_ctrl_c(python_handlers):
    results = build.parallel_map(_dispositions, range(8), desc="test")
    assert results == [(signal.SIG_DFL, signal.SIG_IGN)] * 8
    assert multiprocessing.active_children() == []  # closed and joined: no worker outlives the build


def test_generate_distinct_workers_take_the_default_sigterm(python_handlers):
    results = build.generate_distinct(_keyed_dispositions, lambda i: i, 6, desc="test")
    assert results == [(signal.SIG_DFL, signal.SIG_IGN)] * 6
    assert multiprocessing.active_children() == []


def test_a_failing_item_stops_the_build_and_ends_every_worker(python_handlers):
    with pytest.raises(ValueError, match="item 3 is bad"):
        build.parallel_map(_fails_on_three, range(8), desc="test")
    assert multiprocessing.active_children() == []
