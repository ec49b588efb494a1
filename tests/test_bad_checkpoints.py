"""Resuming from a truncated file, random bytes, or a checkpoint of another arch stops with one
clear line, and the run folder it would have continued is left as it was."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from conftest import run_script


def _fingerprint(run_dir) -> dict[str, str]:
    keep = ("checkpoints", "eval", "metrics.jsonl", "config.json")
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.relative_to(run_dir).parts[0] in keep}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_root):
    run_dir = tmp_path_factory.mktemp("finished")
    run_script("pretrain.py", "experiment=smoke", f"hydra.run.dir={run_dir}", data_root=data_root)
    return run_dir


@pytest.mark.parametrize("kind,expected", [
    ("truncated", "is unreadable (truncated or corrupt?)"),
    ("random_bytes", "is unreadable (truncated or corrupt?)"),
    ("other_arch", "was trained with a different config (arch.hidden_size"),
])
def test_bad_resume_checkpoint(kind, expected, finished_run, tmp_path, data_root):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = _fingerprint(run_dir)
    bad = tmp_path / f"{kind}.pt"
    data = (finished_run / "checkpoints" / "last.pt").read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 3], "random_bytes": os.urandom(len(data)),
                     "other_arch": data}[kind])
    overrides = ["experiment=smoke", f"hydra.run.dir={run_dir}", f"resume={bad}"]
    if kind == "other_arch":
        overrides += ["arch.hidden_size=64"]
    proc = run_script("pretrain.py", *overrides, data_root=data_root, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint") and str(bad) in last and expected in last, last
    assert _fingerprint(run_dir) == before
