"""sweeps/autorank.yaml through Hydra: the AutoRank sweeper (hydra_plugins/athena_autorank) runs each trial as an
ordinary pretrain.py job and feeds its returned score to the search, resumes from its trials file, and the report
draws it. The toy variant runs through a real `pretrain.py -m` on the CPU; the GPU study's config is composed and
validated."""

from __future__ import annotations

import json
import re

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from athena.config import validate_config
from helpers import CONF, ROOT, last_line_error, run_script

TOY = ["--config-dir", "sweeps", "--config-name", "autorank_toy"]


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory, data_root):
    """The frozen base of the toy study, as sweeps/autorank_toy.yaml documents it (fewer steps: any weights do)."""
    run = tmp_path_factory.mktemp("autorank_base")
    run_script("pretrain.py", "experiment=lm_smoke", "train.steps=5", "train.eval_every=null", "device=cpu",
               f"hydra.run.dir={run}", data_root=data_root)
    return run / "checkpoints" / "last.pt"


@pytest.mark.slow
def test_the_toy_sweep_runs_each_trial_as_a_job_resumes_and_reports(toy_base, tmp_path, data_root):
    sweep = tmp_path / "sweep"
    run_script("pretrain.py", "-m", *TOY, f"init_from={toy_base}", f"hydra.sweep.dir={sweep}", data_root=data_root)
    records = [json.loads(line) for line in (sweep / "autorank_trials.jsonl").read_text().splitlines()]
    assert [r["source"] for r in records] == ["initial", "initial", "gp", "gp"]  # n_initial=2, then one q=2 batch
    assert len({json.dumps(r["ranks"], sort_keys=True) for r in records}) == 4
    for record in records:
        run = sweep / f"trial_{record['trial']:03d}"
        assert record["info"] == {"run_dir": str(run), "status": "ok"}
        assert 0 < record["total_rank"] <= 32
        config = json.loads((run / "config.json").read_text())  # an ordinary run folder with its own config
        assert config["adapter"]["rank_pattern"] == record["rank_pattern"]
        assert record["value"] == json.loads((run / "eval" / "final.json").read_text())["perplexity"]
        log = (run / "pretrain.log").read_text()
        adapted = sum(r > 0 for r in record["rank_pattern"].values())
        params = re.search(r"trainable parameters: (\d+) of", log).group(1)
        assert int(params) == record["trainable_params"] and adapted >= 1  # exactly the budgeted LoRA
    result = json.loads((sweep / "autorank_result.json").read_text())
    assert result["value"] == min(r["value"] for r in records)

    # Resume: the same sweep asked for one more trial runs exactly one, in a new folder, with a new pattern.
    run_script("pretrain.py", "-m", *TOY, f"init_from={toy_base}", f"hydra.sweep.dir={sweep}",
               "hydra.sweeper.num_trials=5", data_root=data_root)
    again = [json.loads(line) for line in (sweep / "autorank_trials.jsonl").read_text().splitlines()]
    assert again[:4] == records and len(again) == 5
    assert again[4]["ranks"] not in [r["ranks"] for r in records]
    assert sorted(p.name for p in sweep.glob("trial_*")) == [f"trial_{i:03d}" for i in range(5)]

    from athena.report.autorank import write_autorank_report  # python -m athena.report's AutoRank part

    written = write_autorank_report(sweep, tmp_path / "report", baseline=sweep)  # its own trials as a second curve
    assert [p.name for p in written] == ["autorank_ranks.png", "autorank_best_so_far.png", "autorank.md"]
    assert all(p.stat().st_size > 1000 for p in written)
    text = (tmp_path / "report" / "autorank.md").read_text()
    assert text.count("\n| ") == 6 and "After 5 trials" in text  # header + 5 trials


@pytest.mark.slow
def test_a_sweep_without_an_adapter_stops_in_one_line(tmp_path, data_root):
    proc = run_script("pretrain.py", "-m", *TOY, "adapter=none", f"hydra.sweep.dir={tmp_path}", data_root=data_root,
                      check=False, full_errors=False)
    assert last_line_error(proc) == "error: autorank: the trials have no adapter; add adapter=lora (its ranks are " \
                                    "searched)"


def test_the_smollm2_study_composes_and_validates():
    with initialize_config_dir(config_dir=str(ROOT / "sweeps"), version_base="1.3"):
        cfg = compose("autorank", overrides=[f"hydra.searchpath=[file://{CONF}]"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("AutoRankSweeper") and sweeper.rank_budget == 30 * 7 * 8
    assert (sweeper.direction, sweeper.layers_per_slot) == ("maximize", 5)
    config = OmegaConf.to_container(cfg, resolve=False)
    del config["hydra"]
    run = validate_config(OmegaConf.to_container(OmegaConf.create(config), resolve=True))
    assert (run.adapter.name, run.arch.hyperparameters()["pretrained"], run.data.name) == ("lora", "smollm2",
                                                                                          "sft_wordnet_gloss")
    assert run.train.steps == 60 and run.evaluator.kwargs()["limit"] == 200
