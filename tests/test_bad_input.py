"""Mistakes a new user makes on the command line, each answered in one line that names the key or option and the
valid ones (closest first), with nothing created or changed; a busy run folder; a disk that fills up mid-save."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, fingerprint, last_line_error, run_script, script_env

pytestmark = pytest.mark.slow  # end-to-end runs in subprocesses

SMOKE = ("experiment=smoke",)


@pytest.mark.parametrize("overrides,expected", [
    (["foo=1"], "error: unknown config key 'foo'"),
    (["optimizer.lr=abc"], "error: unknown config key 'optimizer.lr'; closest: optimizer.model.lr, "
                           "optimizer.puzzle_embedding.lr"),
    (["adapter=lora", "adapter.rnk=4"], "error: unknown config key 'adapter.rnk'; closest: adapter.rank"),
    (["adapter=polly"], "error: unknown option adapter=polly; valid options: poly, "),
    (["experiment=smok"], "error: unknown option experiment=smok; valid options: smoke, "),
    (["train.lr=["], "error: cannot parse the override 'train.lr=['"),
    (["+seed=3"], "error: seed already exists: override it without the '+'"),
    (["train.lr=-1"], "error: invalid config: train.lr: Input should be greater than 0 (got -1)"),
    (["train.lr=${nope}"], "error: invalid config: Interpolation key 'nope' not found"),
    (["arch.mixer=attention", "arch.hidden_size=30", "arch.num_heads=4"],
     "error: invalid config: arch: hidden_size 30 is not divisible by num_heads 4"),
    (["arch.ffn_capacity=1.5"], "error: invalid config: arch.ffn_capacity: Input should be less than or equal to 1 "
                                "(got 1.5)"),

])
def test_config_mistakes_are_one_line_and_create_nothing(overrides, expected, tmp_path, data_root):
    run_dir = tmp_path / "outputs" / "run"
    proc = run_script("pretrain.py", *SMOKE, *overrides, f"hydra.run.dir={run_dir}", data_root=data_root,
                      check=False, full_errors=False)
    last = last_line_error(proc)
    assert last.startswith(expected), last
    assert not run_dir.exists() and not (tmp_path / "outputs").exists(), sorted(tmp_path.rglob("*"))


def test_a_component_given_an_argument_it_does_not_take_is_one_line(tmp_path, data_root):
    """Built at set-up (after the config check): Hydra's instantiation error is unwrapped to the target's own."""
    proc = run_script("pretrain.py", *SMOKE, "callbacks=[{_target_:tests.plugins.FreezeModuleAt,modul:net,step:1}]",
                      f"hydra.run.dir={tmp_path}", data_root=data_root, check=False, full_errors=False)
    last = last_line_error(proc)
    assert last.startswith("error: invalid config: tests.plugins.FreezeModuleAt: ") and "modul" in last, last


def test_option_list_is_complete_and_closest_first(tmp_path, data_root):
    proc = run_script("pretrain.py", "adapter=polly", f"hydra.run.dir={tmp_path / 'run'}", data_root=data_root,
                      check=False, full_errors=False)
    listed = last_line_error(proc).split("valid options: ")[1].split(", ")
    assert sorted(listed) == sorted(p.stem for p in (ROOT / "conf" / "adapter").glob("*.yaml"))
    assert listed[0] == "poly"


def test_evaluate_without_a_checkpoint_is_one_line(data_root):
    proc = run_script("evaluate.py", data_root=data_root, check=False, full_errors=False)
    assert last_line_error(proc).startswith("error: no checkpoint given: python evaluate.py checkpoint=")


def test_evaluate_with_an_unknown_key_is_one_line(data_root):
    proc = run_script("evaluate.py", "checkpoint=x.pt", "eval.max_exmples=3", data_root=data_root, check=False,
                      full_errors=False)
    assert last_line_error(proc).startswith("error: unknown config key 'eval.max_exmples'; closest: eval.max_examples")


def test_mlp_mixer_has_no_heads_to_divide(tmp_path, data_root):
    """num_heads only shapes attention: with the MLP mixer an indivisible hidden size is a valid model."""
    run_script("pretrain.py", *SMOKE, "arch.mixer=mlp", "arch.hidden_size=30", "arch.num_heads=4", "train.steps=2",
               "train.eval_every=null", "train.checkpoint_every=null", f"hydra.run.dir={tmp_path}", data_root=data_root)
    assert json.loads((tmp_path / "eval" / "final.json").read_text())["step"] == 2


def _start_long_run(run_dir, data_root) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "pretrain.py"), *SMOKE, "train.steps=100000",
                             "train.eval_every=null", "train.checkpoint_every=50", f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, env=script_env(data_root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_second_run_in_a_busy_folder_stops_and_changes_nothing(tmp_path, data_root):
    run_script("pretrain.py", *SMOKE, "train.steps=1", f"hydra.run.dir={tmp_path / 'warm'}", data_root=data_root)
    run_dir = tmp_path / "run"
    first = _start_long_run(run_dir, data_root)
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoints" / "last.pt").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended early"
        first.send_signal(signal.SIGSTOP)  # freeze it, so the folder holds still while we compare
        before = fingerprint(run_dir)
        log_before = (run_dir / "pretrain.log").read_text()
        proc = run_script("pretrain.py", *SMOKE, f"hydra.run.dir={run_dir}", "resume=auto", data_root=data_root,
                          check=False, full_errors=False)
        last = last_line_error(proc)
        assert last.startswith(f"error: run folder {run_dir} is in use by pid {first.pid}"), last
        assert fingerprint(run_dir) == before
        assert (run_dir / "pretrain.log").read_text() == log_before  # not a line from the refused run
    finally:
        first.send_signal(signal.SIGCONT)
        first.kill()
        first.wait()
    # A killed holder frees the folder (the kernel drops its lock): the next run continues there.
    run_script("pretrain.py", *SMOKE, "train.steps=55", "train.eval_every=null", "resume=auto",
               f"hydra.run.dir={run_dir}", data_root=data_root)
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 55


def test_stale_temp_files_of_a_killed_save_are_removed_on_start(tmp_path, data_root):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir(parents=True)
    stale = [checkpoints / ".step_10.pt.tmp-4242", checkpoints / ".last.pt.tmp-4242"]
    for path in stale:
        path.write_bytes(b"")  # what a SIGKILL during torch.save leaves
    run_script("pretrain.py", *SMOKE, "train.steps=2", "train.eval_every=null", f"hydra.run.dir={tmp_path}",
               data_root=data_root)
    assert not any(path.exists() for path in stale)
    assert "removed 2 partial checkpoint file(s)" in (tmp_path / "pretrain.log").read_text()


def _file_size_limit(limit: int):
    def apply():  # in the child: writes beyond `limit` bytes fail with EFBIG instead of killing it (SIGXFSZ)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_save_that_does_not_fit_on_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, data_root):
    """A full disk, simulated with the file-size limit (`ulimit -f`; the same OSError path as ENOSPC): the step-20
    save fails, its partial file is removed, step_10.pt / last.pt stay as they were, and the run says so in one
    line."""
    run_script("pretrain.py", *SMOKE, "train.steps=10", "train.eval_every=null", f"hydra.run.dir={tmp_path}",
               data_root=data_root)
    size = (tmp_path / "checkpoints" / "step_10.pt").stat().st_size
    before = fingerprint(tmp_path / "checkpoints")
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *SMOKE, "train.eval_every=null", "resume=auto",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=script_env(data_root, full_errors=False),
                          capture_output=True, text=True, timeout=300, preexec_fn=_file_size_limit(size // 2))
    last = last_line_error(proc)
    assert last.startswith(f"error: could not write {tmp_path}/checkpoints/step_20.pt: File too large"), last
    assert "the partial file was removed and earlier checkpoints are kept" in last
    assert fingerprint(tmp_path / "checkpoints") == before  # no partial file, last.pt still step 10
