"""logger=wandb runs real wandb (offline) and logs the same keys as metrics.jsonl."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from helpers import run_script

pytestmark = pytest.mark.slow  # end-to-end runs in subprocesses


def _records(run_file) -> list[bytes]:
    """The payloads of a .wandb transaction log: a 7-byte file header, then LevelDB-log-style 32 KiB
    blocks of records, each with a 7-byte header (crc32, little-endian length, type: 1 full,
    2 first, 3 middle, 4 last). wandb 0.31 ships no Python reader for it."""
    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", "not a wandb transaction log"
    pos, block, payloads, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            payloads.append(pending)
    return payloads


def _history(run_file) -> list[dict]:
    """The history rows logged to an offline run."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for payload in _records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_logs_the_jsonl_keys(tmp_path, data_root):
    run_script("pretrain.py", "experiment=smoke", "logger=wandb", "logger.mode=offline", "train.eval_every=null",
               f"hydra.run.dir={tmp_path}", data_root=data_root)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history = _history(next(runs[0].glob("run-*.wandb")))
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_jsonl = [r for r in jsonl if "train/lm_loss" in r]
    train_wandb = [r for r in history if "train/lm_loss" in r]
    assert [r["_step"] for r in train_wandb] == [r["step"] for r in train_jsonl]
    for ours, theirs in zip(train_jsonl, train_wandb):
        assert theirs["train/lm_loss"] == ours["train/lm_loss"]
        assert theirs["train/grad_norm"] == ours["train/grad_norm"]
    assert any("eval/exact_accuracy" in r for r in history)
    images = {k: v for r in history for k, v in r.items() if k.startswith("eval/accuracy_by_step/")}
    assert images.get("eval/accuracy_by_step/_type") == "image-file", "the eval plot should be logged as an image"
    state = json.loads((tmp_path / "config.json").read_text())
    assert state["logger"]["name"] == "wandb"


def test_resumed_run_continues_the_same_wandb_run(tmp_path, data_root):
    common = ("experiment=smoke", "logger=wandb", "logger.mode=offline", "train.eval_every=null",
              f"hydra.run.dir={tmp_path}")
    run_script("pretrain.py", *common, "train.steps=10", data_root=data_root)
    run_script("pretrain.py", *common, "train.steps=20", "resume=auto", data_root=data_root)
    ids = sorted(p.name.rsplit("-", 1)[-1] for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(ids) == 2 and ids[0] == ids[1]
    steps = [r["_step"] for p in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb") for r in _history(p)
             if "train/lm_loss" in r]
    assert sorted(steps) == [5, 10, 15, 20]


def test_multirun_jobs_get_their_own_wandb_runs(tmp_path, data_root):
    run_script("pretrain.py", "-m", "experiment=smoke", "logger=wandb", "logger.mode=offline", "train.eval_every=null",
               "train.steps=5,10", f"hydra.sweep.dir={tmp_path}", data_root=data_root)
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "metrics.jsonl").exists())
    assert len(jobs) == 2
    ids = [next((job / "wandb").glob("offline-run-*")).name.rsplit("-", 1)[-1] for job in jobs]
    assert ids[0] != ids[1]
    last_steps = sorted(max(r["_step"] for r in _history(next(job.glob("wandb/offline-run-*/run-*.wandb"))))
                        for job in jobs)
    assert last_steps == [5, 10]
