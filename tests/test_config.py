"""Every option of every config group composes and validates; bad configs stop with one line."""

from __future__ import annotations

import importlib
import inspect

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_method
from omegaconf import OmegaConf

from athena.config import ARCH_SCHEMAS, ConfigError, validate_config
from helpers import CONF, composed, run_script

GROUPS = ["train", "arch", "adapter", "task", "evaluator", "data", "optimizer", "freezing", "exit", "memory", "logger",
          "rehearsal", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


ALL_OPTIONS = [(g, o) for g in GROUPS for o in options(g)]
# Options that need a value no default can give (rehearsal=buffer: which earlier tasks to replay).
REQUIRED = {("rehearsal", "buffer"): ["rehearsal.from_data=[sudoku4]"]}


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group} has no options"


@pytest.mark.parametrize("group,option", ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_each_option_composes_and_validates(group, option):
    config = composed(f"{group}={option}", *REQUIRED.get((group, option), []))
    cfg = validate_config(config)
    # What is built from the validated nodes (model_dump(by_alias=True) -> instantiate) must hold every key and
    # value the YAML gave: validation may add defaults, never drop, rename or change what was written.
    for node in ("arch", "data", "optimizer", "logger", "train", "adapter", "memory"):
        assert_keeps(config[node], getattr(cfg, node).model_dump(by_alias=True), node)


def assert_keeps(given, validated, path: str) -> None:
    if isinstance(given, dict):
        assert isinstance(validated, dict), f"{path}: a mapping became {validated!r}"
        for key, value in given.items():
            assert key in validated, f"{path}.{key}: dropped or renamed by validation"
            assert_keeps(value, validated[key], f"{path}.{key}")
    elif isinstance(given, list):  # a YAML list may validate to a tuple (betas)
        assert list(validated) == given, f"{path}: {given!r} became {validated!r}"
    else:
        assert validated == given and type(validated) in (type(given), float), f"{path}: {given!r} became {validated!r}"


def _target_nodes(node, path=""):
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for key, value in node.items():
            yield from _target_nodes(value, f"{path}.{key}" if path else key)


@pytest.mark.parametrize("group,option", ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_targets_match_their_signatures(group, option):
    """Like torchtune's check: each `_target_` exists and accepts every key given to it."""
    cfg = composed(f"{group}={option}")
    cfg.pop("hydra", None)
    for path, node in _target_nodes(cfg):
        target = get_method(node["_target_"])
        params = inspect.signature(target).parameters
        if node["_target_"] in ARCH_SCHEMAS:  # the model takes its hyperparameters as its schema's fields
            module, _, name = ARCH_SCHEMAS[node["_target_"]].partition(":")
            params = getattr(importlib.import_module(module), name).model_fields
        takes_kwargs = any(getattr(p, "kind", None) is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for key in node:
            if key.startswith("_"):
                continue
            assert takes_kwargs or key in params, f"{path}: {node['_target_']} has no parameter {key!r}"


@pytest.mark.parametrize("override,expected", [
    ("+train.learning_rate=0.1", "train.learning_rate: unknown key"),
    ("train.lr=-1", "train.lr: Input should be greater than 0"),
    ("train.lr=fast", "train.lr: Input should be a valid number"),
    ("arch.L_cycles=0", "arch.L_cycles: Input should be greater than or equal to 1"),
    ("arch.mixer=conv", "arch.mixer"),
    ("train.epochs=3", "set exactly one of train.steps and train.epochs"),
    ("device=tpu", "device must be auto, cpu, cuda or cuda:N"),
    ("train.parallel=zero", "train.parallel: Input should be 'ddp' or 'fsdp'"),
])
def test_bad_values_fail_with_one_clear_line(override, expected):
    with pytest.raises(ConfigError) as info:
        validate_config(composed(override))
    message = str(info.value)
    assert expected in message and "\n" not in message


@pytest.mark.slow
def test_cli_rejects_bad_config_before_any_work(tmp_path):
    empty_data_root = tmp_path / "data"
    proc = run_script("pretrain.py", "train.lr=-1", f"hydra.run.dir={tmp_path / 'bad_run'}",
                      data_root=empty_data_root, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: invalid config: train.lr:")
    assert not empty_data_root.exists(), "no dataset should be built for an invalid config"


@pytest.mark.slow
def test_cli_prints_composed_config(data_root):
    proc = run_script("pretrain.py", "arch=athena_trm_mlp", "--cfg", "job", data_root=data_root)
    printed = OmegaConf.create(proc.stdout)
    assert printed.arch.mixer == "mlp" and printed.arch.hidden_size == 512


def test_builder_targets_import():
    for option in options("data"):
        target = composed(f"data={option}")["data"]["build"]["_target_"]
        module, _, name = target.rpartition(".")
        assert callable(getattr(importlib.import_module(module), name))


@pytest.mark.parametrize("overrides, task, evaluator", [
    (["arch=smollm2", "data=text"], "CausalLMTask", "PerplexityEvaluator"),
    (["arch=hf_causal_lm", "data=text_tiny"], "CausalLMTask", "PerplexityEvaluator"),
    (["arch=smollm2", "data=sft_wordnet_gloss", "evaluator=lm_eval", "evaluator.tasks=[wordnet_gloss]"],
     "CausalLMTask", "LMEvalEvaluator"),
    (["data=sudoku6"], "TRMTask", "PuzzleEvaluator"),
])
def test_the_data_picks_the_task_and_evaluator_it_needs(overrides, task, evaluator):
    """Text data trains a causal LM (and the corpus is scored by perplexity) without naming the task, as ARC data
    picks its evaluator; an explicit option on the command line still wins."""
    cfg = composed(*overrides)
    assert (cfg["task"]["_target_"].rsplit(".", 1)[1], cfg["evaluator"]["_target_"].rsplit(".", 1)[1]) == (task,
                                                                                                         evaluator)
