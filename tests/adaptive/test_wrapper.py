"""HierarchicalAdaptiveWrapper on tiny random Llamas (hidden 64, 4 layers, vocab 200): what it routes, what it
skips, what it keeps, what it equals, what trains, and decoding with its KV cache."""

from __future__ import annotations

import pytest
import torch

from athena.adaptive import AdaptiveConfigError, HierarchicalAdaptiveWrapper, default_exit_layers
from athena.adaptive.capacity_router import round_half_up
from athena.models.hf import causal_lm

VOCAB, SEQ = 200, 24


def tiny_base(seed: int = 0, layers: int = 4):
    torch.manual_seed(seed)
    model = causal_lm(VOCAB, 64, 1, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128,
                      num_layers=layers)
    return model.eval()


def token_ids(batch: int = 3, length: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def with_exits(base, capacity=0.55, routing="topk", rates=0.25):
    """A wrapper whose gates exit about `rates` of the tokens each (calibrated: untrained gates exit none)."""
    model = HierarchicalAdaptiveWrapper(base, exit_layers=[1, 2, 3], capacity=capacity, routing=routing).eval()
    model.calibrate(token_ids(4, SEQ, seed=7), exit_rates=[rates] * 3)
    return model


def test_default_exits_scale_the_reference_layers():
    assert default_exit_layers(22) == [4, 8, 12, 16, 19]
    assert default_exit_layers(30) == [5, 11, 16, 22, 26]  # SmolLM2's depth
    assert default_exit_layers(4) == [1, 2, 3]


def test_capacity_one_without_exits_equals_the_base_exactly(one_thread):
    base = tiny_base()
    model = HierarchicalAdaptiveWrapper(base, exit_layers=[], capacity=1.0).eval()
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(input_ids=ids).logits)  # the base's own ops, in its order
    prompt = ids[:2, :6]
    expected = base.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=10), expected)


@pytest.mark.parametrize("capacity", [0.55, 0.3])
def test_each_layer_runs_the_ffn_on_round_c_times_its_active_tokens(capacity, one_thread):
    model = with_exits(tiny_base(), capacity=capacity)
    rows_seen = []
    hooks = [layer.mlp.register_forward_hook(lambda _m, args, _o: rows_seen.append(args[0].shape[0]))
             for layer in model.parts.layers]
    ids = token_ids()
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    exit_layer = model.last_exit_layer  # (B, L): the layer after which each token left (4: never)
    assert (exit_layer < 4).any() and (exit_layer == 4).any()  # the calibrated gates did stop some tokens
    expected = []
    for i in range(4):  # 0-based layer i runs for tokens that left after layer i + 1 or later
        active_per_row = (exit_layer >= i + 1).sum(-1).tolist()
        expected.append(sum(round_half_up(capacity * n) for n in active_per_row))
    assert rows_seen == expected  # the MLP really saw only these rows: gathered, not masked
    assert model.last_stats.routed == expected


def test_skipped_tokens_pass_the_ffn_residual_unchanged(one_thread):
    model = HierarchicalAdaptiveWrapper(tiny_base(), exit_layers=[], capacity=0.5).eval()
    layer = model.parts.layers[0]
    h = torch.randn(2, SEQ, 64)
    with torch.no_grad():
        out = model._ffn(0, layer, h, None, [SEQ, SEQ], "topk", False, None)
        routed = model.routers[0].scores(h).topk(SEQ // 2, dim=-1).indices
        dense = h + layer.mlp(layer.post_attention_layernorm(h))
    chosen = torch.zeros(2, SEQ, dtype=torch.bool)
    chosen[torch.arange(2)[:, None], routed] = True
    assert torch.equal(out[~chosen], h[~chosen])  # bit for bit: nothing added to a skipped token
    # A routed token: the same FFN on fewer rows; a GEMM over another row count may sum in another order (1e-6).
    torch.testing.assert_close(out[chosen], dense[chosen], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_exited_tokens_keep_their_state_to_the_lm_head(training, one_thread):
    model = with_exits(tiny_base(), rates=0.3)
    model.train(training)
    final = {}
    hook = model.parts.norm.register_forward_hook(lambda _m, args, _o: final.setdefault("h", args[0].detach()))
    model._recording = {}  # the stream at each gate
    try:
        torch.manual_seed(3)
        model(token_ids())
    finally:
        seen, model._recording = model._recording, None
        hook.remove()
    exit_layer = model.last_exit_layer
    for gate_layer in (1, 2, 3):
        left = exit_layer == gate_layer
        assert left.any()
        assert torch.equal(final["h"][left], seen[("gate", gate_layer)][left].detach())
    stayed = exit_layer == 4
    assert not torch.equal(final["h"][stayed], seen[("gate", 3)][stayed].detach())  # the others went on


def test_causal_routing_of_a_prefix_ignores_later_tokens(one_thread):
    model = with_exits(tiny_base(), capacity=0.5, routing="causal", rates=0.2)
    a = token_ids(2, SEQ, seed=1)
    b = a.clone()
    b[:, 12:] = token_ids(2, SEQ - 12, seed=99)  # same first 12 tokens, different rest

    def decisions(ids, routing):
        chosen = []
        hooks = [layer.mlp.register_forward_hook(lambda _m, args, _o: chosen.append(args[0].sum(-1)))
                 for layer in model.parts.layers]
        with torch.no_grad():
            logits = model(ids, routing=routing).logits
        for hook in hooks:
            hook.remove()
        return logits, model.last_exit_layer.clone(), model.last_stats.routed

    logits_a, exits_a, _ = decisions(a, "causal")
    logits_b, exits_b, _ = decisions(b, "causal")
    assert torch.equal(exits_a[:, :12], exits_b[:, :12])
    # same decisions, same computation on the prefix; attention over a longer key block may sum in another order
    torch.testing.assert_close(logits_a[:, :12], logits_b[:, :12], rtol=1e-5, atol=1e-5)
    # top-k is not causal: over the same prefix it picks differently once later tokens compete (the test could fail)
    model.routing = "topk"
    top_a, _, _ = decisions(a[:, :12], "topk")
    top_full, _, _ = decisions(a, "topk")
    assert not torch.allclose(top_a, top_full[:, :12], atol=1e-4)


def test_decoding_with_the_kv_cache_equals_decoding_without(one_thread):
    model = with_exits(tiny_base(), capacity=0.5, routing="causal", rates=0.2)
    prompt = token_ids(2, 8)
    cached = model.generate(prompt, max_new_tokens=12, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=12, use_cache=False)
    assert torch.equal(cached, uncached)
    # and the logits of the cached steps equal one causal forward over the whole sequence
    from athena.adaptive import AdaptiveCache

    cache, steps = AdaptiveCache(), []
    with torch.no_grad():
        steps.append(model(cached[:, :8], past_key_values=cache).logits)
        for t in range(8, cached.shape[1]):
            steps.append(model(cached[:, t:t + 1], past_key_values=cache).logits)
        whole = model(cached, routing="causal").logits
    # one token at a time vs a block: attention sums in another order (float32 round-off)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("phase,trains", [("full", {"routers", "gates"}), ("routers", {"routers"}),
                                          ("exit", {"gates"})])
def test_gradients_reach_only_gates_and_routers(phase, trains, one_thread):
    model = HierarchicalAdaptiveWrapper(tiny_base(), exit_layers=[1, 2, 3], capacity=0.5, phase=phase,
                                        gate_bias_init=0.0).train()  # gates that exit half the tokens
    torch.manual_seed(0)
    logits = model(token_ids()).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), token_ids()[:, 1:].reshape(-1))
    aux = model.aux_losses()
    (loss + sum(aux.values())).backward()
    assert all(p.grad is None for p in model.base.parameters())
    for group in ("routers", "gates"):
        params = list(getattr(model, group).parameters())
        if group in trains:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), group
        else:
            assert all(p.grad is None for p in params), group
    assert ("router_z_loss" in aux) == ("routers" in trains) and ("exit_cost" in aux) == ("gates" in trains)


def test_bad_settings_and_other_layouts_stop_in_one_line():
    base = tiny_base()
    with pytest.raises(AdaptiveConfigError, match="capacity"):
        HierarchicalAdaptiveWrapper(base, capacity=1.5)
    with pytest.raises(AdaptiveConfigError, match=r"exit_layers \[4\] out of range"):
        HierarchicalAdaptiveWrapper(base, exit_layers=[4])
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(AdaptiveConfigError, match="'gpt2'") as error:
        HierarchicalAdaptiveWrapper(gpt2)
    assert "\n" not in str(error.value)
