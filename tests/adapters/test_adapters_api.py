"""The public adapter API: the names `from athena import ...` gives, PolyAdapter building its own base layer from
in_features/out_features, and HybridAdapterConfig mapping onto AdapterConfig."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import athena
import athena.adapters
from athena.adapters import AdapterConfig, AdapterConfigError, BottleneckWrapper, PolyAdapter, add_adapters
from helpers import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def tiny_trm():
    from athena.models.trm import TinyRecursiveModel

    torch.manual_seed(0)
    return TinyRecursiveModel(vocab_size=6, seq_len=8, num_puzzle_identifiers=2, hidden_size=32, num_heads=4,
                              num_layers=2, H_cycles=1, L_cycles=1, halt_max_steps=2, puzzle_emb_len=2,
                              expansion=2.0)


def test_the_names_users_reach_for_come_from_athena():
    from athena import (
        AdapterConfig as Config, PolyAdapter as Poly, TinyRecursiveModel, add_adapters as add,
        add_hybrid_adapter_to_model, load_adapter, merge_and_unload, quantize_adapter_model, save_adapter,
    )
    from athena.adapters import hybrid, io, merge, quantize
    from athena.models.trm import TinyRecursiveModel as Trm

    assert (Config, Poly, add) == (AdapterConfig, PolyAdapter, add_adapters)
    assert (save_adapter, load_adapter) == (io.save_adapter, io.load_adapter)
    assert add_hybrid_adapter_to_model is hybrid.add_hybrid_adapter_to_model
    assert (merge_and_unload, quantize_adapter_model) == (merge.merge_and_unload, quantize.quantize_adapter_model)
    assert TinyRecursiveModel is Trm


@pytest.mark.parametrize("package", [athena, athena.adapters], ids=["athena", "athena.adapters"])
def test_every_exported_name_resolves_and_a_wrong_one_is_an_attribute_error(package):
    for name in package.__all__:
        assert getattr(package, name).__name__ == name
    assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError, match="has no attribute 'PolyAdaptor'"):
        package.PolyAdaptor


@pytest.mark.slow
def test_importing_athena_or_its_config_schema_loads_no_torch():
    """pretrain.py imports athena.cli and athena.config before it validates anything; the public names load torch
    only when first used, so `--help` and a bad config stay fast (torch and its compiler take seconds)."""
    code = ("import sys, athena, athena.config, athena.adapters; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- PolyAdapter builds its own base ----

def test_poly_adapter_builds_a_linear_base_from_its_shape():
    torch.manual_seed(0)
    layer = PolyAdapter(in_features=64, out_features=32, rank=8)
    base = layer.base_layer
    assert type(base) is nn.Linear and (base.in_features, base.out_features) == (64, 32) and base.bias is not None
    assert (layer.lora_A.weight.shape, layer.lora_B.weight.shape) == ((8, 64), (32, 8))
    x = torch.randn(3, 5, 64)
    assert torch.equal(layer(x), base(x))  # LoRA B starts at zero
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.1)
    expected = base(x) + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * layer.scaling
    torch.testing.assert_close(layer(x), expected)
    layer(x).square().sum().backward()
    assert layer.lora_A.weight.grad.abs().sum() > 0 and layer.lora_B.weight.grad.abs().sum() > 0
    assert PolyAdapter(in_features=4, out_features=3, bias=False).base_layer.bias is None


def test_poly_adapter_shape_arguments_must_be_complete_and_agree():
    with pytest.raises(AdapterConfigError, match="in_features and out_features") as info:
        PolyAdapter(in_features=64)
    assert "\n" not in str(info.value)
    with pytest.raises(AdapterConfigError, match="out_features=30 does not match the base layer's 32"):
        PolyAdapter(nn.Linear(64, 32), out_features=30)
    assert PolyAdapter(nn.Linear(64, 32), in_features=64).in_features == 64


# ---- HybridAdapterConfig ----

def test_hybrid_adapter_config_maps_onto_adapter_config():
    from athena import HybridAdapterConfig

    hybrid = HybridAdapterConfig(lora_rank=4, adapter_size=16, adapter_dropout=0.1, shared_parameters=True,
                                 target_modules=["mlp.down_proj"], apply_lora_to=["qkv_proj"])
    assert hybrid.to_adapter_config() == AdapterConfig(
        method="hybrid", rank=4, bottleneck_size=16, bottleneck_dropout=0.1, share_across_layers=True,
        target_modules=["mlp.down_proj"], apply_lora_to=["qkv_proj"])
    assert HybridAdapterConfig().to_adapter_config() == AdapterConfig(method="hybrid")  # the same defaults


def test_hybrid_adapter_config_names_the_field_the_caller_wrote():
    from athena import HybridAdapterConfig

    with pytest.raises(AdapterConfigError) as info:
        HybridAdapterConfig(adapter_size=0)
    message = str(info.value)
    assert message.startswith("hybrid adapter config: adapter_size: ") and "\n" not in message


def test_add_hybrid_adapter_to_model_takes_a_hybrid_adapter_config():
    from athena import HybridAdapterConfig, add_hybrid_adapter_to_model

    torch.manual_seed(1)
    via_hybrid = add_hybrid_adapter_to_model(tiny_trm(), HybridAdapterConfig(lora_rank=4, adapter_size=8,
                                                                              shared_parameters=True))
    torch.manual_seed(1)
    via_config = add_adapters(tiny_trm(), AdapterConfig(method="hybrid", rank=4, bottleneck_size=8,
                                                        share_across_layers=True))
    layer = via_hybrid.net.layers[0]
    assert isinstance(layer.attn.qkv_proj, PolyAdapter) and layer.attn.qkv_proj.rank == 4
    assert isinstance(layer.mlp.down_proj, BottleneckWrapper) and layer.mlp.down_proj.adapter.bottleneck_size == 8
    assert layer.mlp.down_proj.adapter is via_hybrid.net.layers[1].mlp.down_proj.adapter  # shared_parameters
    ours, theirs = via_hybrid.state_dict(), via_config.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert via_hybrid.adapter_config == via_config.adapter_config
    with pytest.raises(AdapterConfigError, match="needs method='hybrid'"):
        add_hybrid_adapter_to_model(tiny_trm(), AdapterConfig(method="lora"))
