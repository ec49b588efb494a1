"""athena.adapters on tiny randomly initialised Hugging Face models (no hub): default targets per family,
and LoRA / IA3 interchange with the real peft package in both directions."""

import copy
import warnings

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


def _seeded(build):
    def tiny():
        torch.manual_seed(0)
        return build().eval()
    return tiny


T = transformers
# One tiny model per architecture family whose module names the default targets must know.
FAMILY_MODELS = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "qwen2": _seeded(lambda: T.Qwen2ForCausalLM(T.Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100))),
    "phi3": _seeded(lambda: T.Phi3ForCausalLM(T.Phi3Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, pad_token_id=0))),
    "gpt_neox": _seeded(lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100))),
    "t5": _seeded(lambda: T.T5ForConditionalGeneration(T.T5Config(
        d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4, vocab_size=100))),
    "t5_gated": _seeded(lambda: T.T5ForConditionalGeneration(T.T5Config(
        d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4, vocab_size=100, feed_forward_proj="gated-gelu"))),
    "bart": _seeded(lambda: T.BartForConditionalGeneration(T.BartConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=64))),
    "clip": _seeded(lambda: T.CLIPModel(T.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=100, max_position_embeddings=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=16, patch_size=8),
        projection_dim=16))),
    "vit": _seeded(lambda: T.ViTModel(T.ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
        patch_size=8))),
}
_QKV = ("q", "k", "v")
# What the hybrid mode must pick per family, as the module path after the block index: LoRA on every attention
# projection, the bottleneck after the FFN's output projection.
HYBRID_KINDS = {
    "llama": ({f"self_attn.{p}_proj" for p in (*_QKV, "o")}, {"mlp.down_proj"}),
    "gpt2": ({"attn.c_attn", "attn.c_proj"}, {"mlp.c_proj"}),
    "bert": ({"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"},
             {"output.dense"}),
    "qwen2": ({f"self_attn.{p}_proj" for p in (*_QKV, "o")}, {"mlp.down_proj"}),
    "phi3": ({"self_attn.qkv_proj", "self_attn.o_proj"}, {"mlp.down_proj"}),
    "gpt_neox": ({"attention.query_key_value", "attention.dense"}, {"mlp.dense_4h_to_h"}),
    "t5": ({f"{a}.{p}" for a in ("SelfAttention", "EncDecAttention") for p in (*_QKV, "o")}, {"DenseReluDense.wo"}),
    "t5_gated": ({f"{a}.{p}" for a in ("SelfAttention", "EncDecAttention") for p in (*_QKV, "o")},
                 {"DenseReluDense.wo"}),
    "bart": ({f"{a}.{p}_proj" for a in ("self_attn", "encoder_attn") for p in (*_QKV, "out")}, {"fc2"}),
    "clip": ({f"self_attn.{p}_proj" for p in (*_QKV, "out")}, {"mlp.fc2"}),
    "vit": ({f"attention.{p}_proj" for p in (*_QKV, "o")}, {"mlp.fc2"}),
}

IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def outputs(model) -> torch.Tensor:
    """Every tensor the model returns for a fixed input, flattened into one (no grad)."""
    model_type = model.config.model_type
    if model_type == "vit":
        kwargs = dict(pixel_values=PIXELS)
    elif model_type == "clip":
        kwargs = dict(input_ids=IDS, pixel_values=PIXELS)
    elif model_type in ("t5", "bart"):
        kwargs = dict(input_ids=IDS, decoder_input_ids=IDS[:, :5])
    else:
        kwargs = dict(input_ids=IDS)
    with torch.no_grad():
        out = model(**kwargs)
    return torch.cat([t.flatten() for t in out.to_tuple() if isinstance(t, torch.Tensor)])


def block_linears(model) -> dict[str, str]:
    """path -> kind (the path after its last numeric part) of every linear layer inside a numbered block."""
    from transformers.pytorch_utils import Conv1D

    found = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        numeric = [i for i, p in enumerate(parts) if p.isdigit()]
        if isinstance(module, (nn.Linear, Conv1D)) and numeric:
            found[name] = ".".join(parts[numeric[-1] + 1:])
    return found


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


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_default_targets_cover_every_linear_of_each_family(family):
    """LoRA by default adapts every linear layer inside the blocks (no kind silently skipped, no warning); the
    hybrid mode puts LoRA on exactly the attention projections and the bottleneck after the FFN output; and fresh
    adapters of each method leave the outputs unchanged (T5's FFN reads `wo.weight`, so this also runs it)."""
    base = FAMILY_MODELS[family]()
    linears = block_linears(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known family must not warn about skipped layers
        lora = add_adapters(copy.deepcopy(base), AdapterConfig(method="lora", rank=2))
        hybrid = add_adapters(copy.deepcopy(base), AdapterConfig(method="hybrid", rank=2, bottleneck_size=4))
    assert wrapped(lora) == sorted(linears)
    attention, ffn_out = HYBRID_KINDS[family]
    assert wrapped(hybrid) == sorted(n for n, kind in linears.items() if kind in attention)
    assert wrapped(hybrid, BottleneckWrapper) == sorted(n for n, kind in linears.items() if kind in ffn_out)
    assert {linears[n] for n in wrapped(hybrid)} == attention  # every named kind exists in the model
    expected = outputs(base)
    assert torch.equal(outputs(lora), expected) and torch.equal(outputs(hybrid), expected)
    poly = add_adapters(copy.deepcopy(base), AdapterConfig(method="poly", rank=2))
    assert torch.equal(outputs(poly), expected)


def test_partly_known_family_warns_which_layers_are_skipped():
    """GPT-J names its attention like BART (q_proj .. out_proj) but its FFN fc_in / fc_out like no known family:
    the defaults adapt the attention and say, in one warning, that the FFN layers got nothing."""
    torch.manual_seed(0)
    gptj = transformers.GPTJForCausalLM(transformers.GPTJConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                                                                n_positions=32, rotary_dim=4)).eval()
    with pytest.warns(UserWarning) as record:
        model = add_adapters(copy.deepcopy(gptj), AdapterConfig(method="lora", rank=2))
    messages = [str(w.message) for w in record if "without adapters" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0], messages
    assert "['mlp.fc_in', 'mlp.fc_out']" in messages[0] and "target_modules" in messages[0]
    assert {n.split(".")[-1] for n in wrapped(model)} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # naming the layers is the way to say "these on purpose"
        named = add_adapters(copy.deepcopy(gptj),
                             AdapterConfig(method="lora", rank=2, target_modules=["q_proj", "fc_in"]))
    assert len(wrapped(named)) == 4


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
