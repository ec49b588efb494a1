"""AMRPA on tiny random transformers (real transformers models, 2-4 layers, hidden 32): target patterns, one-line
errors, a closed gate equal to the original, window and decay against a direct computation, causality, metrics,
reset, regularisers, freezing and save/load."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from athena.memory.amrpa import (
    AMRPAConfig,
    AMRPAConfigError,
    amrpa_aux_loss,
    amrpa_parameters,
    get_amrpa_metrics,
    inject_amrpa,
    load_amrpa,
    reset_amrpa_history,
    resolve_layers,
    save_amrpa,
)
from athena.memory.amrpa.inject import amrpa_memories

VOCAB = 120
SMALL = dict(alpha_mlp_hidden=16)  # keeps the selection MLP tiny; its width changes nothing tested here


def tiny(kind: str, layers: int = 4, attn: str = "eager") -> transformers.PreTrainedModel:
    configs = {
        "bert": lambda: transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                                                num_attention_heads=4, intermediate_size=64),
        "distilbert": lambda: transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=layers, n_heads=4,
                                                            hidden_dim=64),
        "albert": lambda: transformers.AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32,
                                                    num_hidden_layers=layers, num_attention_heads=4,
                                                    intermediate_size=64),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4,
                                                bos_token_id=None, eos_token_id=None),
        "llama": lambda: transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                                  bos_token_id=None, eos_token_id=None, pad_token_id=None),
    }
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(configs[kind](), attn_implementation=attn).eval()


def batch(seed: int = 1, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 3:] = 0  # right padding in the second row
    return {"input_ids": ids, "attention_mask": mask}


def open_memory(model, strength: float = 1.0) -> None:
    """Random selection weights and a given gate strength, so the memory path does something measurable."""
    g = torch.Generator().manual_seed(7)
    for _, memory in amrpa_memories(model):
        for p in memory.selector.parameters():
            p.data = torch.randn(p.shape, generator=g)
        memory.gate_strength.data.fill_(strength)


def hidden(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


# ------------------------------------------------------------------------------------------- patterns and errors

@pytest.mark.parametrize("pattern,expected", [
    ("last_4", {6: [2, 3, 4, 5], 12: [8, 9, 10, 11], 24: [20, 21, 22, 23]}),
    ("first_3", {6: [0, 1, 2], 12: [0, 1, 2], 24: [0, 1, 2]}),
    ("middle_6", {6: [0, 1, 2, 3, 4, 5], 12: [3, 4, 5, 6, 7, 8], 24: [9, 10, 11, 12, 13, 14]}),
    ("2:5", {6: [2, 3, 4], 12: [2, 3, 4], 24: [2, 3, 4]}),
    ("-2:", {6: [4, 5], 12: [10, 11], 24: [22, 23]}),
    ([5, -2, 1], {6: [1, 4, 5], 12: [1, 5, 10], 24: [1, 5, 22]}),
])
def test_target_patterns_resolve_for_6_12_24_layers(pattern, expected):
    for layers, indices in expected.items():
        assert resolve_layers(pattern, layers) == indices
    assert resolve_layers("6:10", 12) == [6, 7, 8, 9] and resolve_layers("all", 6) == list(range(6))


@pytest.mark.parametrize("kwargs,says", [
    (dict(target_layers="last4"), "unknown layer pattern 'last4'"),
    (dict(target_layers="middle_x"), "unknown layer pattern"),
    (dict(target_layers=[3, 3]), "repeat"),
    (dict(target_layers=[]), "selects no layer"),
    (dict(target_layers=[1.5]), "integers"),
    (dict(memory_decay=1.5), "memory_decay"),
    (dict(gate_activation="relu"), "gate_activation"),
    (dict(max_window_size=0), "max_window_size"),
    (dict(alpha_temperature=0), "alpha_temperature"),
    (dict(window=3), "unknown field"),
])
def test_bad_config_fails_in_one_line(kwargs, says):
    with pytest.raises(AMRPAConfigError) as error:
        AMRPAConfig(**kwargs)
    assert says in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("pattern,layers,says", [
    ("last_13", 12, "needs 1..12 layers"), ([24], 24, "outside a model of 24 layers"), ("10:12", 6, "selects no"),
    ([3, -3], 6, "names a layer twice")])
def test_pattern_that_does_not_fit_the_model_fails_in_one_line(pattern, layers, says):
    with pytest.raises(AMRPAConfigError) as error:
        resolve_layers(pattern, layers)
    assert says in str(error.value) and "\n" not in str(error.value)


def test_models_it_cannot_serve_are_refused_in_one_line():
    t5 = transformers.T5Model(transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                                    num_heads=2))
    checkpointed = tiny("llama")
    from athena.models.hf import enable_activation_checkpointing

    enable_activation_checkpointing(checkpointed)
    cases = [(t5, "encoder-decoder"), (torch.nn.Linear(2, 2), "Hugging Face"), (checkpointed, "checkpointing")]
    for model, says in cases:
        with pytest.raises(AMRPAConfigError) as error:
            inject_amrpa(model)
        assert says in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(AMRPAConfigError, match="fewer than the fixed window"):
        inject_amrpa(tiny("bert"), AMRPAConfig(adaptive_window=False, max_window_size=3, target_layers=[2], **SMALL))
    with pytest.raises(AMRPAConfigError, match="already has AMRPA"):
        inject_amrpa(inject_amrpa(tiny("bert"), AMRPAConfig(**SMALL)), AMRPAConfig(**SMALL))


# ------------------------------------------------------------------------------------------- identity when closed

@pytest.mark.parametrize("kind", ["bert", "distilbert", "albert", "gpt2", "llama"])
def test_closed_gate_equals_the_original_exactly(kind):
    inputs = batch()
    eager = hidden(tiny(kind), inputs)
    sdpa = hidden(tiny(kind, attn="sdpa"), inputs)
    model = inject_amrpa(tiny(kind), AMRPAConfig(target_layers="last_3", **SMALL))
    open_memory(model, strength=0.0)  # random selection weights, but the gate closed
    assert torch.equal(hidden(model, inputs), eager)  # the same eager arithmetic, bit for bit
    model = inject_amrpa(tiny(kind, attn="sdpa"), AMRPAConfig(target_layers="last_3", **SMALL))
    open_memory(model, strength=0.0)
    # Against SDPA's fused kernel only float32 round-off differs (measured <= 1e-6 on these models).
    torch.testing.assert_close(hidden(model, inputs), sdpa, rtol=0, atol=1e-5)
    open_memory(model, strength=1.0)
    assert (hidden(model, inputs) - sdpa).abs().max() > 1e-4  # opened, the memory changes the output


def test_fresh_injection_is_the_original_and_starts_learning():
    """gate_init_strength=0: the injected model starts as the original; the strength still gets a gradient."""
    inputs = batch()
    reference = hidden(tiny("llama"), inputs)
    model = inject_amrpa(tiny("llama"), AMRPAConfig(target_layers="last_2", **SMALL)).train()
    out = model(**inputs).last_hidden_state
    model.eval()
    assert torch.equal(hidden(model, inputs), reference)
    out.pow(2).mean().backward()
    strengths = [memory.gate_strength.grad for _, memory in amrpa_memories(model)]
    assert all(g is not None and g.abs().sum() > 0 for g in strengths)


# ------------------------------------------------------------------------------------------- the memory itself

def test_window_and_decay_match_a_direct_computation():
    """Layer 3 of a 4-layer BERT with a window of 2: its pattern mixes layers 1 and 2 (never 0) with weights
    alpha * gamma**distance, renormalised, gated by sigmoid(sensitivity * cosine + bias) * strength."""
    inputs = batch()
    base = tiny("bert")
    with torch.no_grad():
        seen = {}
        def keep_hidden(module, args, kwargs):
            seen["hidden"] = kwargs.get("hidden_states", args[0] if args else None)

        base.encoder.layer[3].attention.self.register_forward_pre_hook(keep_hidden, with_kwargs=True)
        reference = base(**inputs, output_attentions=True)
    own_patterns = reference.attentions  # the original model's patterns (layers 0-2 are unchanged by AMRPA)

    config = AMRPAConfig(target_layers=[3], max_window_size=2, memory_decay=0.5, alpha_temperature=1.0,
                         gate_sensitivity=3.0, gate_bias=-0.5, **SMALL)
    model = inject_amrpa(tiny("bert"), config)
    open_memory(model, strength=0.8)
    used = {}
    model.encoder.layer[3].attention.self.register_forward_hook(lambda m, a, out: used.update(probs=out[1]))
    with torch.no_grad():
        model(**inputs)
        memory = amrpa_memories(model)[0][1]
        alpha = torch.softmax(memory.selector(seen["hidden"]).view(2, 12, 4, 2).transpose(1, 2) / 1.0, dim=-1)
        mixed = alpha[..., 0, None] * 0.5 ** 2 * own_patterns[1] + alpha[..., 1, None] * 0.5 * own_patterns[2]
        mixed = mixed / mixed.sum(-1, keepdim=True)
        own = own_patterns[3]
        cosine = (own * mixed).sum(-1) / (own.norm(dim=-1) * mixed.norm(dim=-1))
        gate = torch.sigmoid(3.0 * cosine - 0.5) * 0.8
        expected = own + gate[..., None] * (mixed - own)
    # float32 round-off of two routes through the same arithmetic
    torch.testing.assert_close(used["probs"], expected, rtol=0, atol=1e-6)
    assert (expected - own).abs().max() > 1e-3  # and the memory made a real difference
    assert memory.window == 2 and torch.allclose(memory.decay, torch.tensor([0.25, 0.5]))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causal_models_never_see_later_tokens_through_the_memory(kind):
    model = inject_amrpa(tiny(kind), AMRPAConfig(target_layers="last_3", memory_noise=0.0, **SMALL))
    open_memory(model, strength=1.0)
    ids = batch()["input_ids"]
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 5) % VOCAB
    before, after = hidden(model, {"input_ids": ids}), hidden(model, {"input_ids": changed})
    assert torch.equal(before[:, :7], after[:, :7])  # positions before the change: bit for bit the same
    assert (before[:, 7:] - after[:, 7:]).abs().max() > 1e-4
    # In training too (noise on the remembered patterns): the earlier positions still cannot depend on token 7.
    model.train()
    torch.manual_seed(3)
    noisy_before = model(input_ids=ids).last_hidden_state
    torch.manual_seed(3)
    noisy_after = model(input_ids=changed).last_hidden_state
    assert torch.equal(noisy_before[:, :7], noisy_after[:, :7])


def test_kv_cache_decoding_matches_the_full_forward():
    model = inject_amrpa(tiny("llama"), AMRPAConfig(target_layers="last_2", memory_noise=0.0, **SMALL))
    open_memory(model)
    ids = batch()["input_ids"][:1]
    with torch.no_grad():
        full = model(input_ids=ids).last_hidden_state
        cache = transformers.DynamicCache(config=model.config)
        model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
        last = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).last_hidden_state
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=0, atol=1e-5)  # cached vs full matmul order


# ------------------------------------------------------------------------------------------- metrics, reset, losses

def test_metrics_one_value_per_targeted_layer():
    model = inject_amrpa(tiny("bert", layers=6), AMRPAConfig(target_layers="last_4", max_window_size=3, **SMALL))
    open_memory(model, strength=0.5)
    hidden(model, batch())
    metrics = get_amrpa_metrics(model)
    assert metrics["layers"].tolist() == [2, 3, 4, 5] and metrics["window"].tolist() == [2, 3, 3, 3]
    for name in ("gate_mean", "gate_impact", "alpha_diversity", "memory_similarity", "gate_strength"):
        assert metrics[name].shape == (4,) and torch.isfinite(metrics[name]).all(), name
        assert ((metrics[name] >= 0) & (metrics[name] <= 1 + 1e-6)).all(), name
    assert (metrics["gate_impact"] > 0).all() and (metrics["gate_mean"] < 0.5 + 1e-6).all()  # strength 0.5 caps it


def test_reset_clears_the_history_and_batches_do_not_leak():
    model = inject_amrpa(tiny("llama"), AMRPAConfig(target_layers="last_2", **SMALL))
    open_memory(model)
    short, long = batch(seed=1, length=8), batch(seed=2, length=12)
    alone = hidden(model, long)
    hidden(model, short)
    assert torch.equal(hidden(model, long), alone)  # the earlier batch leaves nothing behind
    assert model._amrpa_state.history and torch.isfinite(get_amrpa_metrics(model)["gate_mean"]).all()
    reset_amrpa_history(model)
    assert not model._amrpa_state.history and torch.isnan(get_amrpa_metrics(model)["gate_mean"]).all()


def test_regularisers_and_freezing():
    model = inject_amrpa(tiny("bert"), AMRPAConfig(target_layers="last_2", diversity_weight=0.5,
                                                   gate_reg_weight=2.0, **SMALL)).train()
    open_memory(model, strength=0.5)
    model(**batch())
    aux = amrpa_aux_loss(model)
    memories = [m for _, m in amrpa_memories(model)]
    gate = torch.stack([m.last_metrics["gate_mean"] for m in memories]).mean()
    diversity = torch.stack([m.last_metrics["alpha_diversity"] for m in memories]).mean()
    torch.testing.assert_close(aux.detach(), 0.5 * (1 - diversity) + 2.0 * gate)  # the documented formula
    aux.backward()
    assert all(p.grad is not None for p in amrpa_parameters(model))
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".amrpa." not in f".{n}")
    assert amrpa_aux_loss(model) is None  # taken: nothing pending until the next training forward
    partly = inject_amrpa(tiny("bert"), AMRPAConfig(freeze_base_model=False, **SMALL))
    frozen = {n for n, p in partly.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in partly.embeddings.word_embeddings.named_parameters(prefix="embeddings."
                                                                                       "word_embeddings")}


# ------------------------------------------------------------------------------------------- saving

def test_save_and_load_round_trip(tmp_path):
    inputs = batch()
    model = inject_amrpa(tiny("distilbert"), AMRPAConfig(target_layers="2:4", max_window_size=2, **SMALL))
    open_memory(model, strength=0.7)
    expected = hidden(model, inputs)
    model.save_pretrained(tmp_path)  # the base config and weights (AMRPA keys ride along, ignored on load)
    save_amrpa(model, tmp_path)
    loaded = load_amrpa(transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="eager"), tmp_path)
    assert torch.equal(hidden(loaded.eval(), inputs), expected)
    # A whole state dict (what Athena's checkpoints hold) loads into a fresh model injected the same way.
    fresh = inject_amrpa(tiny("distilbert"), AMRPAConfig(target_layers="2:4", max_window_size=2, **SMALL))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(hidden(fresh, inputs), expected)
    with pytest.raises(AMRPAConfigError, match="do not fit"):
        load_amrpa(tiny("distilbert", layers=3), tmp_path)


def test_selection_weights_follow_the_temperature():
    model = inject_amrpa(tiny("bert"), AMRPAConfig(target_layers=[3], max_window_size=3, **SMALL))
    open_memory(model)
    memory = amrpa_memories(model)[0][1]
    h = torch.randn(1, 5, 32)
    sharp = memory.selection(h)
    memory.temperature = 4.0
    flat = memory.selection(h)
    entropy = lambda a: -(a * a.clamp_min(1e-30).log()).sum(-1).mean() / math.log(3)  # noqa: E731
    assert torch.allclose(sharp.sum(-1), torch.ones(1, 4, 5)) and entropy(flat) > entropy(sharp)
