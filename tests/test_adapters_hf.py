"""athena.adapters on tiny randomly initialised Hugging Face models (no hub): default targets per family,
and LoRA / IA3 interchange with the real peft package in both directions."""

import copy

import pytest
import torch
from torch import nn

from athena.adapters import (
    AdapterConfig, BottleneckWrapper, PolyAdapter, add_adapters, load_adapter, merge_and_unload, save_adapter,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=100)
    return transformers.BertModel(cfg).eval()


IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        out = model(input_ids=IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "ia3_l" in name:
                noise = torch.randn(p.shape, generator=g) * 0.1
                p.copy_(1.0 + noise if "ia3_l" in name else p + noise)


def wrapped(model, cls=PolyAdapter):
    return sorted(n for n, m in model.named_modules() if isinstance(m, cls))


def test_adapters_added_to_an_eval_model_run_no_dropout_and_match_peft(tmp_path):
    """A peft LoRA with dropout, loaded into an eval-mode model: the new adapter modules are in eval mode too, so
    outputs are deterministic and equal to peft's eval outputs (left in train mode, the dropout moved these logits by
    up to 0.46 from peft's and by up to 0.53 between two calls)."""
    base = tiny_llama()
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj", "down_proj"],
                           init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(base), lcfg).eval()
    expected = logits(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    model = load_adapter(copy.deepcopy(base), tmp_path)
    layers = [m for m in model.modules() if isinstance(m, PolyAdapter)]
    assert len(layers) == 6 and all(isinstance(m.dropout, nn.Dropout) and not m.dropout.training for m in layers)
    first = logits(model)
    assert torch.equal(first, logits(model))
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-5)
    # and in train mode the dropout does run (as in peft)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(input_ids=IDS).logits, first)


def test_family_defaults():
    llama = add_adapters(tiny_llama(), AdapterConfig(method="lora", rank=2))
    assert {n.split(".")[-1] for n in wrapped(llama)} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"}
    assert len(wrapped(llama)) == 14
    gpt2 = add_adapters(tiny_gpt2(), AdapterConfig(method="lora", rank=2))
    assert {n.split(".", 3)[-1] for n in wrapped(gpt2)} == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert all(m.fan_in_fan_out for m in gpt2.modules() if isinstance(m, PolyAdapter))
    bert = add_adapters(tiny_bert(), AdapterConfig(method="lora", rank=2))
    assert len(wrapped(bert)) == 12  # query key value attention.output.dense intermediate.dense output.dense x 2
    hybrid = add_adapters(tiny_bert(), AdapterConfig(method="hybrid", rank=2, bottleneck_size=4))
    assert wrapped(hybrid, BottleneckWrapper) == [f"encoder.layer.{i}.output.dense" for i in (0, 1)]
    assert {n.split(".", 3)[-1] for n in wrapped(hybrid)} == {
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"}


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert])
@pytest.mark.parametrize("method", ["lora", "poly", "hybrid"])
def test_fresh_adapters_equal_the_hf_base(build, method):
    base = build()
    model = add_adapters(copy.deepcopy(base), AdapterConfig(method=method, rank=4, bottleneck_size=8))
    assert torch.equal(logits(model), logits(base))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_athena_adapter_loads_in_peft_with_same_outputs(tmp_path, build, method):
    base = build()
    cfg = AdapterConfig(method=method, rank=4, alpha=8.0, layers_to_skip=[1],
                        rank_pattern={"v_proj": 2, "c_fc": 2} if method == "lora" else {})
    model = add_adapters(copy.deepcopy(base), cfg)
    randomize(model)
    expected = logits(model)
    assert not torch.allclose(expected, logits(base), atol=1e-4)
    save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model), expected, atol=1e-5, rtol=1e-5)
    # and merged in peft, as a last check that the fan_in_fan_out flag is right for Conv1D
    torch.testing.assert_close(logits(peft_model.merge_and_unload()), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("build, targets", [(tiny_llama, ["q_proj", "v_proj", "down_proj"]),
                                            (tiny_gpt2, ["c_attn", "c_proj"])])
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_lora_loads_into_athena_with_same_outputs(tmp_path, build, targets, rslora):
    base = build()
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_rslora=rslora,
                           rank_pattern={"down_proj": 2} if build is tiny_llama else {"c_proj": 2},
                           fan_in_fan_out=build is tiny_gpt2)
    peft_model = peft.get_peft_model(copy.deepcopy(base), lcfg).eval()
    expected = logits(peft_model)
    assert not torch.allclose(expected, logits(base), atol=1e-4)
    peft_model.save_pretrained(str(tmp_path))
    model = load_adapter(copy.deepcopy(base), tmp_path)
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, PolyAdapter)}
    assert sorted(set(ranks.values())) == [2, 4] and len(ranks) == 2 * (len(targets) + (build is tiny_gpt2))
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    # Athena can save it back and peft reads that again
    save_adapter(model, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "again")).eval()
    torch.testing.assert_close(logits(again), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(merge_and_unload(model)), expected, atol=1e-4, rtol=1e-4)
