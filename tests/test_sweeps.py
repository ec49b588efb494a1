"""sweeps/: the TRM adaptation study as one Hydra multirun through pretrain.py (sweeps/adaptation_trm.yaml), run end to
end at toy size on the CPU (sweeps/adaptation_trm_toy.yaml), and what a multirun needs from a run: a failed job does
not stop the others, and each job starts without the memory of the jobs before it."""

from __future__ import annotations

import gc
import json
import signal
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from athena.config import compose_config, validate_config
from helpers import CONF, ROOT, last_line_error, run_script, script_env, wait_until_training

SWEEPS = ROOT / "sweeps"
TOY = ["--config-dir", "sweeps", "--config-name", "adaptation_trm_toy"]
# TRM-MLP, as study 2 in docs/adaptation.md: hybrid then puts its LoRA on the token-mixing MLP (seq_mlp).
ARCH = "arch=athena_trm_mlp"
TOY_DATA = ["data.build.num_train=16", "data.build.num_aug=1", "data.build.num_test=16", "data.build.min_difficulty=0"]


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory, data_root) -> Path:
    """Phase 1 at toy size, as sweeps/adaptation_trm_toy.yaml documents it."""
    run = tmp_path_factory.mktemp("adapt_base")
    run_script("pretrain.py", *TOY, "experiment=adapt_base", "init_from=null", ARCH, f"hydra.run.dir={run}",
               data_root=data_root)
    return run / "checkpoints" / "last.pt"


def test_adaptation_sweep_runs_one_job_per_method_and_summarises(toy_base, tmp_path, data_root):
    sweep = tmp_path / "sweep"
    run_script("pretrain.py", "-m", *TOY, f"init_from={toy_base}", ARCH, "adaptation=full,hybrid",
               f"hydra.sweep.dir={sweep}", data_root=data_root)
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["full", "hybrid"]  # one folder per method
    expected = {"full": ("none", 3e-4), "hybrid": ("hybrid", 3e-3)}  # conf/adaptation/: adapter and lr together
    finals = {}
    for method, (adapter, lr) in expected.items():
        config = json.loads((sweep / method / "config.json").read_text())
        assert (config["adapter"]["name"], config["train"]["lr"]) == (adapter, lr)
        assert config["init_from"] == str(toy_base) and config["data"]["name"] == "sudoku_x"
        assert config["arch"]["mixer"] == "mlp" and config["train"]["steps"] == 4
        finals[method] = json.loads((sweep / method / "eval" / "final.json").read_text())
        assert finals[method]["step"] == 4 and finals[method]["count"] == 16
        assert "adapter=" + adapter in (sweep / method / "pretrain.log").read_text()  # each job logs to its own file

    # The reference row: the base on Sudoku-X without training.
    run_script("evaluate.py", f"checkpoint={toy_base}", "data=sudoku_x", *TOY_DATA, f"eval.output_dir={tmp_path}",
               "eval.name=zero_shot", data_root=data_root)
    proc = subprocess.run([sys.executable, "bench/summarise_adaptation.py", "summary", str(sweep), "--zero-shot",
                           str(tmp_path / "zero_shot.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split(" | ")[0] for row in rows] == ["| base, no adaptation", "| full fine-tuning",
                                                    "| hybrid (LoRA attn + bottleneck FFN)"]
    records = {r["method"]: r for r in map(json.loads, (sweep / "adaptation_trm.jsonl").read_text().splitlines())}
    assert records["full"]["trainable_params"] == records["full"]["total_params"]
    assert 0 < records["hybrid"]["trainable_params"] < records["hybrid"]["total_params"]
    for method, final in finals.items():
        assert records[method]["test_token_accuracy"] == final["token_accuracy"]
        assert records[method]["step_ms"] > 0
    assert (sweep / "adaptation_trm.md").read_text() == proc.stdout  # the table it printed
    assert (sweep / "adaptation_trm.png").stat().st_size > 5000
    assert (sweep / "adaptation_runs" / "hybrid.jsonl").read_bytes() == (sweep / "hybrid" / "metrics.jsonl").read_bytes()


def test_a_failed_job_leaves_the_other_jobs_running(toy_base, tmp_path, data_root):
    """The first job's base does not exist: it stops before any training, the second job still trains, and the sweep
    ends with the first job's line."""
    sweep = tmp_path / "sweep"
    missing = tmp_path / "no_base.pt"
    proc = run_script("pretrain.py", "-m", *TOY, f"init_from={missing},{toy_base}", ARCH, "adaptation=full",
                      "hydra.sweep.subdir=job${hydra.job.num}", f"hydra.sweep.dir={sweep}", data_root=data_root,
                      check=False, full_errors=False)
    assert last_line_error(proc) == f"error: checkpoint not found: {missing} (job {sweep / 'job0'})"
    assert {p.name for p in (sweep / "job0").iterdir()} == {"pretrain.log", ".athena.lock"}  # no metrics, no checkpoint
    assert "error: checkpoint not found" in (sweep / "job0" / "pretrain.log").read_text()
    assert json.loads((sweep / "job1" / "eval" / "final.json").read_text())["step"] == 4


def test_a_signal_stops_the_whole_sweep(toy_base, tmp_path, data_root):
    """SIGTERM (Ctrl-C alike) saves the running job's checkpoint and ends the program: no later job starts."""
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain.py"), "-m", *TOY, f"init_from={toy_base}", ARCH,
                             "adaptation=full,hybrid", "train.steps=100000", f"hydra.sweep.dir={sweep}"], cwd=ROOT,
                            env=script_env(data_root, full_errors=False), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_until_training(sweep / "full" / "metrics.jsonl")
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0 and stderr.strip().splitlines()[-1].startswith("error: stopped by a signal at step")
    assert (sweep / "full" / "checkpoints" / "last.pt").is_file() and not (sweep / "hybrid").exists()


def test_every_method_of_the_study_composes_and_validates():
    """Each conf/adaptation option is in the study's sweep and gives a valid run with the method's adapter and lr."""
    methods = sorted(p.stem for p in (CONF / "adaptation").glob("*.yaml"))
    with initialize_config_dir(config_dir=str(SWEEPS), version_base="1.3"):
        listed = compose("adaptation_trm", overrides=[f"hydra.searchpath=[file://{CONF}]"], return_hydra_config=True)
        assert sorted(listed.hydra.sweeper.params.adaptation.split(",")) == methods
        for method in methods:
            cfg = compose("adaptation_trm", overrides=[f"adaptation={method}", "init_from=base.pt",
                                                       f"hydra.searchpath=[file://{CONF}]"])
            run = validate_config(OmegaConf.to_container(cfg, resolve=True))
            assert run.adapter.name == ("none" if method == "full" else method)
            assert run.train.lr == (3e-4 if method == "full" else 3e-3)
            assert (run.data.name, run.train.steps, run.train.compile) == ("sudoku_x", 300, False)


def test_a_run_frees_the_runs_before_it_in_the_process(tmp_path, data_root, monkeypatch):
    """A multirun trains its jobs in one process: a finished run can live on in reference cycles until a gc pass, so
    the next run's setup collects it (athena.device.start_clean) instead of training beside its weights."""
    from athena.training.recipe import PretrainRecipe

    monkeypatch.setenv("ATHENA_DATA_DIR", str(data_root))
    cfg = validate_config(compose_config(["experiment=smoke", "train.steps=1", "train.eval_every=null", "device=cpu",
                                          "train.checkpoint_every=null"]))

    def run(folder: Path) -> PretrainRecipe:
        recipe = PretrainRecipe(cfg, folder)
        recipe.setup()
        recipe.train()
        recipe.close()
        return recipe

    gc.disable()  # no automatic pass may free the first run by chance
    try:
        recipe = run(tmp_path / "a")
        # Which cycles a run leaves depends on what ran before in the process (a first-time code path can leave an
        # exception's traceback holding its frames); this one stands for them.
        recipe.leftover = recipe
        first = weakref.ref(recipe.model)
        del recipe
        assert first() is not None  # held by the cycle: what a multirun's next job would start beside
        second = PretrainRecipe(cfg, tmp_path / "b")
        second.setup()
        assert first() is None
        second.close()
    finally:
        gc.enable()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_each_run_in_a_process_logs_its_own_peak_memory(tmp_path, data_root, monkeypatch):
    """torch's peak-memory count runs since the process started: without a restart per run, a multirun's smaller job
    would log the peak of a larger one before it."""
    from athena.training.recipe import PretrainRecipe

    monkeypatch.setenv("ATHENA_DATA_DIR", str(data_root))

    def peak_gb(folder: Path, batch: int) -> float:
        cfg = validate_config(compose_config(["experiment=smoke", "device=cuda", f"train.global_batch_size={batch}",
                                              "train.steps=2", "train.log_every=1", "train.eval_every=null",
                                              "train.checkpoint_every=null", "arch.hidden_size=256"]))
        recipe = PretrainRecipe(cfg, folder)
        recipe.setup()
        recipe.train()
        recipe.close()
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return max(r["train/peak_mem_gb"] for r in rows if "train/peak_mem_gb" in r)

    large = peak_gb(tmp_path / "large", 1024)
    small = peak_gb(tmp_path / "small", 8)
    assert small < large / 4, (small, large)
