"""One adapter schema: AdapterConfig holds every knob's type, bounds and default; the run config's `adapter:` node
and the YAML under conf/adapter*/ take them from it instead of repeating them."""

from __future__ import annotations

import copy

import pytest
import yaml

from athena.adapters.config import FIELD_NAMES, AdapterConfig, AdapterConfigError, default_value
from athena.config import AdapterNode, ConfigError, compose_config, validate_config
from helpers import CONF

KNOBS = [name for name in FIELD_NAMES if name != "method"]


def test_yaml_presets_do_not_repeat_the_schema_defaults():
    """A knob in conf/adapter*/ is `${default:adapter.<knob>}` (its value is AdapterConfig's default), or a value
    other than the default that the preset chooses on purpose: never a copy of the default."""
    files = sorted((CONF / "adapter_parts").glob("*.yaml")) + sorted((CONF / "adapter").glob("*.yaml"))
    seen = set()
    for path in files:
        for key, value in (yaml.safe_load(path.read_text()) or {}).items():
            if key in KNOBS:
                seen.add(key)
                assert value == f"${{default:adapter.{key}}}" or value != default_value(key), \
                    f"{path.relative_to(CONF.parent)}: {key}: {value!r} repeats AdapterConfig's default"
    assert seen == set(KNOBS), f"knobs no preset shows: {sorted(set(KNOBS) - seen)}"


@pytest.mark.parametrize("method", ["lora", "moe", "poly", "hybrid"])
def test_composed_presets_record_the_schema_defaults_as_values(method):
    """The resolved config (what config.json and checkpoints keep, and what a resume compares) holds the values
    themselves, equal to those of the presets before the defaults moved into the schema."""
    node = compose_config([f"adapter={method}"])["adapter"]
    assert {k: v for k, v in node.items() if k != "name"} == {k: default_value(k) for k in node if k != "name"}
    assert node["rank"] == 8 and node["alpha"] == 16.0 and node["freeze_base"] is True


def test_the_resolved_preset_prints_its_values():
    """`pretrain.py adapter=poly --cfg job --resolve` resolves the composed tree in place (OmegaConf.resolve), which
    cannot put a plain list or dict where an interpolation was."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["adapter=poly"])
    OmegaConf.resolve(cfg)
    shown = yaml.safe_load(OmegaConf.to_yaml(cfg.adapter))
    assert shown == {"name": "poly", **{k: default_value(k) for k in shown if k != "name"}}
    assert shown["rank_pattern"] == {} and shown["layers_to_skip"] == [] and shown["rank"] == 8


def test_adapter_node_takes_every_knob_and_default_from_adapter_config():
    assert [n for n in AdapterNode.model_fields if n != "name"] == KNOBS
    node = AdapterNode(name="poly")
    assert node.adapter_kwargs() == AdapterConfig(method="poly").to_dict()


# A value AdapterConfig refuses, the method it is tried with, and what the run config's error must name.
BAD = [
    ("rank", -1, "lora", "adapter.rank: Input should be greater than or equal to 0"),
    ("rank", 2.5, "lora", "adapter.rank: Input should be a valid integer"),
    ("alpha", 0, "lora", "adapter.alpha: Input should be greater than 0"),
    ("dropout", 1.0, "lora", "adapter.dropout: Input should be less than 1"),
    ("bottleneck_dropout", -0.1, "hybrid", "adapter.bottleneck_dropout"),
    ("num_experts", 0, "moe", "adapter.num_experts"),
    ("expert_rank", 0, "moe", "adapter.expert_rank"),
    ("router_z_weight", -1.0, "moe", "adapter.router_z_weight"),
    ("bottleneck_size", 0, "hybrid", "adapter.bottleneck_size"),
    ("bottleneck_activation", "swish", "hybrid", "adapter.bottleneck_activation"),
    ("rank_pattern", {"o_proj": -1}, "lora", "adapter.rank_pattern.o_proj"),
    ("layers_to_skip", [-1], "lora", "adapter.layers_to_skip.0"),
    ("target_modules", [], "lora", "adapter.target_modules: selects nothing"),
    ("top_k", 9, "moe", "top_k=9 is larger than num_experts=4"),
    ("rank", 0, "poly", "rank=0 with LoRA on"),
    ("use_ia3", False, "ia3", "adds nothing"),
]


@pytest.mark.parametrize("knob, value, method, expected", BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_the_same_rule_stops_a_bad_value_in_python_and_in_the_run_config(knob, value, method, expected):
    with pytest.raises(AdapterConfigError) as python_error:
        AdapterConfig(method=method, **{knob: value})
    assert "\n" not in str(python_error.value)
    assert python_error.value.field is None or python_error.value.field.split(".")[0] == knob
    config = copy.deepcopy(_composed(method))
    config["adapter"][knob] = value
    with pytest.raises(ConfigError) as run_error:
        validate_config(config)
    assert expected in str(run_error.value) and "\n" not in str(run_error.value)
    assert python_error.value.problem in str(run_error.value)  # the schema's words, once


_COMPOSED: dict[str, dict] = {}


def _composed(method: str) -> dict:
    if method not in _COMPOSED:
        _COMPOSED[method] = compose_config([f"adapter={method}", "init_from=/some/base.pt"])
    return _COMPOSED[method]
