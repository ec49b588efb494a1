"""athena.adapters on single layers and on a tiny TRM: exactness at init, switches, routing, merge, aux loss,
save/load, int8 base, config errors and a short adaptation run."""

import copy

import pytest
import torch
from torch import nn

from athena.adapters import (
    AdapterConfig, AdapterConfigError, BottleneckAdapter, BottleneckWrapper, Int8Linear, PolyAdapter,
    adapter_aux_loss, add_adapters, add_hybrid_adapter_to_model, count_parameters, load_adapter, merge_adapters,
    merge_and_unload, quantize_adapter_model, save_adapter, unmerge_adapters,
)
from athena.models.trm.layers import Linear as AthenaLinear
from athena.models.trm import TinyRecursiveModel

VOCAB, SEQ, NUM_IDS = 6, 16, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def tiny_trm(**overrides) -> TinyRecursiveModel:
    kwargs = dict(vocab_size=VOCAB, seq_len=SEQ, num_puzzle_identifiers=NUM_IDS, hidden_size=32, num_heads=4,
                  num_layers=2, H_cycles=2, L_cycles=2, halt_max_steps=2, puzzle_emb_len=2,
                  halt_exploration_prob=0.0, expansion=2.0)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return TinyRecursiveModel(**kwargs)


def make_batch(batch_size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "inputs": torch.randint(1, VOCAB, (batch_size, SEQ), generator=g),
        "labels": torch.randint(2, VOCAB, (batch_size, SEQ), generator=g),
        "puzzle_identifiers": torch.randint(0, NUM_IDS, (batch_size,), generator=g),
    }


def trm_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        _, out = model(model.initial_carry(batch), batch)
    return out.logits


def randomize_adapters(model: nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Move every adapter parameter off its (identity) init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (PolyAdapter, BottleneckAdapter)):
                for n, p in m.named_parameters():
                    if n.startswith("base_layer."):
                        continue
                    noise = torch.randn(p.shape, generator=g).to(p.dtype) * scale
                    p.copy_(1.0 + noise if n == "ia3_l" else p + noise)


def conv1d(in_f: int, out_f: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(3)
    layer = Conv1D(out_f, in_f)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


BASES = {
    "torch": lambda: nn.Linear(12, 10, bias=True),
    "athena": lambda: AthenaLinear(12, 10, bias=True),
    "conv1d": lambda: conv1d(12, 10),
}


# ---- one PolyAdapter ----

@pytest.mark.parametrize("kind", list(BASES))
def test_all_parts_off_equals_base_exactly(kind):
    torch.manual_seed(0)
    base = BASES[kind]()
    x = torch.randn(3, 5, 12)
    ref = base(x)
    layer = PolyAdapter(base, rank=4, use_lora=True, use_ia3=True, use_moe=True, num_experts=3, top_k=2)
    randomize_adapters(layer)
    assert not torch.allclose(layer(x), ref, atol=1e-4)  # the parts do something once trained...
    layer.use_lora = layer.use_ia3 = layer.use_moe = False
    assert torch.equal(layer(x), ref)  # ...and switched off they are gone, bit for bit
    built_off = PolyAdapter(base, use_lora=False, use_ia3=False, use_moe=False)
    assert torch.equal(built_off(x), ref) and not built_off.adapter_parameters()


@pytest.mark.parametrize("kind", list(BASES))
def test_fresh_adapter_equals_base_and_each_switch_matters(kind):
    torch.manual_seed(0)
    base = BASES[kind]()
    x = torch.randn(2, 7, 12)
    ref = base(x)
    layer = PolyAdapter(base, rank=4, use_lora=True, use_ia3=True, use_moe=True, num_experts=4, top_k=2)
    assert torch.equal(layer(x), ref)
    randomize_adapters(layer)
    full = layer(x)
    for part in ("use_lora", "use_ia3", "use_moe"):
        setattr(layer, part, False)
        assert not torch.allclose(layer(x), full, atol=1e-5), f"{part}=False changed nothing"
        setattr(layer, part, True)


def test_lora_and_ia3_formula_and_rslora_scaling():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    x = torch.randn(4, 12)
    layer = PolyAdapter(base, rank=4, alpha=8.0, use_lora=True, use_ia3=True)
    randomize_adapters(layer)
    expected = base(x) * layer.ia3_l + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * 2.0
    torch.testing.assert_close(layer(x), expected)
    assert PolyAdapter(nn.Linear(12, 10), rank=4, alpha=8.0, use_rslora=True).scaling == pytest.approx(4.0)


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize("moe", [False, True])
def test_merge_matches_unmerged_and_unmerge_restores(kind, moe):
    torch.manual_seed(0)
    base = BASES[kind]()
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = PolyAdapter(base, rank=4, use_lora=True, use_ia3=True, use_moe=moe, num_experts=3, top_k=2)
    randomize_adapters(layer, scale=0.3)
    x = torch.randn(6, 12)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged_parts == ("ia3", "lora")
        assert not torch.allclose(base.weight, w0)
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
        layer.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(base.bias, b0, atol=1e-6, rtol=1e-5)
    assert not layer.merged


@pytest.mark.parametrize("kind", list(BASES))
def test_wrappers_expose_the_base_weight_and_bias(kind):
    """Parents may read `.weight` / `.bias` of a child they call (T5's FFN reads `wo.weight.dtype`): both wrappers
    hand out the wrapped layer's own tensors, as peft's do."""
    base = BASES[kind]()
    poly = PolyAdapter(base, rank=2)
    bottleneck = BottleneckWrapper(poly, BottleneckAdapter(10, bottleneck_size=4))
    for wrapper in (poly, bottleneck):
        assert wrapper.weight is base.weight and wrapper.bias is base.bias
    assert PolyAdapter(nn.Linear(12, 10, bias=False)).bias is None


def test_poly_adapter_builds_the_experts_its_arguments_name():
    """Expert arguments switch the experts on (use_moe left unset): PolyAdapter(base, rank=8, num_experts=4) used to
    build no experts without a word. An explicit use_moe=False still wins."""
    layer = PolyAdapter(nn.Linear(12, 10), rank=8, num_experts=4)
    assert layer.use_moe and layer.router.out_features == 4 and layer.top_k == 2
    assert layer.expert_A.shape == (4 * 8, 12) and layer.lora_A is not None
    assert PolyAdapter(nn.Linear(12, 10), top_k=1).num_experts == 4
    assert PolyAdapter(nn.Linear(12, 10), num_experts=1).top_k == 1  # default top_k fits the experts
    assert PolyAdapter(nn.Linear(12, 10), expert_rank=2).expert_A.shape == (4 * 2, 12)
    off = PolyAdapter(nn.Linear(12, 10), rank=8, num_experts=4, use_moe=False)
    assert off.router is None and not off.use_moe
    assert PolyAdapter(nn.Linear(12, 10), rank=8).router is None  # no expert argument: LoRA only, as before
    with pytest.raises(AdapterConfigError, match="top_k=3 must be in"):
        PolyAdapter(nn.Linear(12, 10), num_experts=2, top_k=3)


def routed_layer(E=6, k=2, seed=0) -> PolyAdapter:
    torch.manual_seed(seed)
    layer = PolyAdapter(nn.Linear(16, 8), rank=3, use_lora=False, use_moe=True, num_experts=E, top_k=k)
    randomize_adapters(layer, scale=0.5)  # non-zero experts B and a non-trivial router
    return layer


def test_topk_routing_picks_exactly_k_experts_with_normalised_weights():
    layer = routed_layer(E=6, k=2)
    gates, _, top_i = layer.route(torch.randn(50, 16))
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(50))
    assert top_i.shape == (50, 2)
    assert len(top_i.unique()) > 2  # different tokens go to different experts


def test_gradients_reach_only_the_selected_experts():
    layer = routed_layer(E=6, k=2)
    r = layer.expert_rank
    for seed in range(3):
        x = torch.randn(1, 16, generator=torch.Generator().manual_seed(seed))  # one token
        chosen = set(layer.route(x)[2][0].tolist())
        layer.zero_grad(set_to_none=True)
        layer(x).square().sum().backward()
        adapter_aux_loss_of(layer)  # drop the accumulated router loss
        for e in range(layer.num_experts):
            a_grad = layer.expert_A.grad[e * r:(e + 1) * r].abs().sum()
            b_grad = layer.expert_B.grad[:, e * r:(e + 1) * r].abs().sum()
            if e in chosen:
                assert a_grad > 0 and b_grad > 0, f"expert {e} was chosen but got no gradient"
            else:
                assert a_grad == 0 and b_grad == 0, f"expert {e} was not chosen but got a gradient"
        assert layer.router.weight.grad.abs().sum() > 0  # the router learns from the task loss too


def adapter_aux_loss_of(layer):
    return layer.pop_aux_loss()


def test_batched_experts_equal_a_naive_per_expert_loop():
    layer = routed_layer(E=5, k=3, seed=2)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        got = layer(x)
        x2 = x.reshape(-1, 16)
        probs = layer.router(x2).softmax(-1)
        r = layer.expert_rank
        expected = layer.base_layer(x2)
        for t in range(x2.shape[0]):  # token by token, expert by expert: the obvious (slow) definition
            top_p, top_i = probs[t].topk(3)
            top_p = top_p / top_p.sum()
            for p, e in zip(top_p, top_i):
                A, B = layer.expert_A[e * r:(e + 1) * r], layer.expert_B[:, e * r:(e + 1) * r]
                expected[t] += p * (B @ (A @ x2[t])) * layer.expert_scaling
    torch.testing.assert_close(got, expected.view(2, 9, 8), atol=1e-5, rtol=1e-5)


def test_aux_loss_is_positive_reaches_the_router_and_resets():
    model = tiny_trm()
    add_adapters(model, AdapterConfig(method="moe", rank=4, num_experts=4, top_k=2))
    batch = make_batch()
    with torch.no_grad():
        model(model.initial_carry(batch), batch)
    assert adapter_aux_loss(model) is None  # no-grad forwards add nothing
    model(model.initial_carry(batch), batch)
    aux = adapter_aux_loss(model)
    assert aux is not None and aux.ndim == 0 and aux.item() > 0
    aux.backward()
    routers = [m.router.weight for m in model.modules() if isinstance(m, PolyAdapter)]
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in routers)
    assert adapter_aux_loss(model) is None  # popped
    lora_only = add_adapters(tiny_trm(), AdapterConfig(method="lora"))
    lora_only(lora_only.initial_carry(batch), batch)
    assert adapter_aux_loss(lora_only) is None


def test_aux_loss_matches_switch_formula():
    layer = routed_layer(E=4, k=1)
    layer.router_aux_weight, layer.router_z_weight = 1.0, 0.0
    x = torch.randn(64, 16)
    layer(x)
    aux = layer.pop_aux_loss()
    probs = layer.router(x).softmax(-1)
    frac = torch.bincount(probs.argmax(-1), minlength=4).float() / 64
    torch.testing.assert_close(aux, 4 * (frac * probs.mean(0)).sum())


# ---- whole models: TRM ----

@pytest.mark.parametrize("method", ["lora", "ia3", "moe", "poly", "hybrid"])
def test_fresh_adapted_trm_equals_base(method):
    base = tiny_trm().eval()
    model = add_adapters(copy.deepcopy(base), AdapterConfig(method=method, rank=4)).eval()
    batch = make_batch()
    assert torch.equal(trm_logits(model, batch), trm_logits(base, batch))
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(any(k in n for k in ("lora_", "ia3_l", "expert_", "router", "adapter.")) for n in names)
    assert not model.puzzle_embedding.weight.requires_grad and not model.embed_tokens.weight.requires_grad


def test_trm_default_targets_and_mlp_mixer():
    model = add_adapters(tiny_trm(), AdapterConfig(method="lora", rank=2))
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, PolyAdapter))
    assert wrapped == [f"net.layers.{i}.{p}" for i in (0, 1)
                       for p in ("attn.o_proj", "attn.qkv_proj", "mlp.down_proj", "mlp.gate_up_proj")]
    base = tiny_trm(mixer="mlp").eval()
    model = add_adapters(copy.deepcopy(base), AdapterConfig(method="poly", rank=2)).eval()
    assert isinstance(model.net.layers[0].seq_mlp.down_proj, PolyAdapter)
    batch = make_batch()
    assert torch.equal(trm_logits(model, batch), trm_logits(base, batch))


def test_layers_to_skip_rank_pattern_and_target_regex():
    cfg = AdapterConfig(method="lora", rank=4, target_modules=["qkv_proj", r"net\.layers\.\d+\.mlp\.down_proj"],
                        rank_pattern={r"layers\.1\.attn\.qkv_proj": 2}, layers_to_skip=[0])
    model = add_adapters(tiny_trm(), cfg)
    wrapped = {n: m.rank for n, m in model.named_modules() if isinstance(m, PolyAdapter)}
    assert wrapped == {"net.layers.1.attn.qkv_proj": 2, "net.layers.1.mlp.down_proj": 4}


def test_rank_zero_in_rank_pattern_leaves_that_module_bare():
    """AutoRank's 0 = no adapter there: the module stays the base linear, the others keep their ranks; a pattern
    that zeroes every target adapts nothing and says so."""
    cfg = AdapterConfig(method="lora", rank=4, rank_pattern={r"layers\.0\.attn\.o_proj": 0, "mlp.down_proj": 2})
    model = add_adapters(tiny_trm(), cfg)
    wrapped = {n: m.rank for n, m in model.named_modules() if isinstance(m, PolyAdapter)}
    assert "net.layers.0.attn.o_proj" not in wrapped and "net.layers.1.attn.o_proj" in wrapped
    assert isinstance(model.net.layers[0].attn.o_proj, AthenaLinear) and wrapped["net.layers.0.mlp.down_proj"] == 2
    assert len(wrapped) == 7  # 2 layers x 4 targets, one left out
    with pytest.raises(AdapterConfigError, match="rank 0 to every target"):
        add_adapters(tiny_trm(), AdapterConfig(method="lora", rank_pattern={".*": 0}))


def test_hybrid_puts_lora_on_attention_and_bottlenecks_after_the_ffn():
    base = tiny_trm().eval()
    cfg = AdapterConfig(method="hybrid", rank=4, bottleneck_size=8, bottleneck_gating=True)
    model = add_hybrid_adapter_to_model(copy.deepcopy(base), cfg)
    layer = model.net.layers[0]
    assert isinstance(layer.attn.qkv_proj, PolyAdapter) and isinstance(layer.attn.o_proj, PolyAdapter)
    assert isinstance(layer.mlp.down_proj, BottleneckWrapper) and not isinstance(layer.mlp.gate_up_proj, PolyAdapter)
    assert layer.mlp.down_proj.adapter is not model.net.layers[1].mlp.down_proj.adapter
    randomize_adapters(model)
    batch = make_batch()
    assert not torch.allclose(trm_logits(model.eval(), batch), trm_logits(base, batch), atol=1e-4)

    shared = add_adapters(copy.deepcopy(base), AdapterConfig(method="hybrid", rank=4, bottleneck_size=8,
                                                              share_across_layers=True))
    a0, a1 = (shared.net.layers[i].mlp.down_proj.adapter for i in (0, 1))
    assert a0 is a1
    per_layer = sum(p.numel() for p in a0.parameters())
    t_shared, _ = count_parameters(shared)
    t_sep, _ = count_parameters(add_adapters(copy.deepcopy(base), AdapterConfig(method="hybrid", rank=4,
                                                                                 bottleneck_size=8)))
    assert t_sep - t_shared == per_layer  # the shared adapter is counted (and optimised) once


def test_bottleneck_adapter_identity_at_init_and_formula():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(10, bottleneck_size=4, activation="relu", gating=True)
    h = torch.randn(3, 10)
    assert torch.equal(adapter(h), h)
    randomize_adapters(adapter)
    expected = h + torch.sigmoid(adapter.gate) * adapter.up(torch.relu(adapter.down(h)))
    torch.testing.assert_close(adapter(h), expected)


def test_trm_merge_unmerge_and_merge_and_unload():
    base = tiny_trm().eval()
    model = add_adapters(copy.deepcopy(base), AdapterConfig(method="poly", rank=4, use_moe=False)).eval()
    randomize_adapters(model)
    batch = make_batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = trm_logits(model, batch)
    merge_adapters(model)
    torch.testing.assert_close(trm_logits(model, batch), unmerged, atol=1e-4, rtol=1e-4)
    unmerge_adapters(model)
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], atol=1e-6, rtol=1e-5)
    merge_and_unload(model)
    assert not any(isinstance(m, PolyAdapter) for m in model.modules())
    assert type(model.net.layers[0].attn.qkv_proj) is AthenaLinear
    torch.testing.assert_close(trm_logits(model, batch), unmerged, atol=1e-4, rtol=1e-4)


def test_experts_stay_unmerged_and_that_is_said():
    model = add_adapters(tiny_trm(), AdapterConfig(method="poly", rank=4)).eval()
    randomize_adapters(model)
    batch = make_batch()
    unmerged = trm_logits(model, batch)
    with pytest.warns(UserWarning, match="experts .* stay unmerged"):
        merge_and_unload(model)
    assert all(isinstance(m, PolyAdapter) and m.merged for m in model.modules() if isinstance(m, PolyAdapter))
    assert any(isinstance(m, PolyAdapter) for m in model.modules())
    # 6 applications of the net per step amplify the float rounding of the merged weights a little
    torch.testing.assert_close(trm_logits(model, batch), unmerged, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("method", ["lora", "ia3", "poly", "hybrid"])
def test_save_load_round_trip_is_exact(tmp_path, method):
    base = tiny_trm().eval()
    cfg = AdapterConfig(method=method, rank=4, bottleneck_size=8, share_across_layers=(method == "hybrid"),
                        rank_pattern={"o_proj": 2} if method == "lora" else {})
    model = add_adapters(copy.deepcopy(base), cfg).eval()
    randomize_adapters(model)
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert not any("base_layer" in k or "embed" in k for k in keys)  # only adapter tensors
    if method in ("lora", "ia3"):
        assert all(k.startswith("base_model.model.") for k in keys)  # peft format
    fresh = load_adapter(copy.deepcopy(base), tmp_path).eval()  # adds the adapters, then loads them
    batch = make_batch()
    assert torch.equal(trm_logits(fresh, batch), trm_logits(model, batch))
    sd, fsd = model.state_dict(), fresh.state_dict()
    assert sd.keys() == fsd.keys() and all(torch.equal(sd[k], fsd[k]) for k in sd)
    into_existing = add_adapters(copy.deepcopy(base), cfg)  # a model that already has the same adapters
    load_adapter(into_existing, tmp_path)
    assert torch.equal(trm_logits(into_existing.eval(), batch), trm_logits(model, batch))


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("method", ["lora", "hybrid"])
def test_new_adapter_modules_take_the_mode_of_the_layer_they_replace(tmp_path, mode, method):
    """Adapters put into an eval-mode model must not run dropout at inference (they were left in train mode);
    put into a training model they train. Holds for add_adapters, the hybrid mode and load_adapter."""
    base = tiny_trm().train(mode == "train")
    cfg = AdapterConfig(method=method, rank=4, dropout=0.5, bottleneck_size=8, bottleneck_dropout=0.5)
    model = add_adapters(copy.deepcopy(base), cfg)
    randomize_adapters(model)
    save_adapter(model, tmp_path)
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    for m in (model, loaded):
        adapters = [a for a in m.modules() if isinstance(a, (PolyAdapter, BottleneckWrapper, BottleneckAdapter))]
        dropouts = [d for a in adapters for d in a.modules() if isinstance(d, nn.Dropout)]
        assert adapters and dropouts and all(x.training == (mode == "train") for x in adapters + dropouts)
    batch = make_batch()
    if mode == "eval":
        first = trm_logits(loaded, batch)
        assert torch.equal(first, trm_logits(loaded, batch)) and torch.equal(first, trm_logits(model, batch))
    built_on_eval = PolyAdapter(nn.Linear(12, 10).eval(), dropout=0.5)
    assert not built_on_eval.training and not built_on_eval.dropout.training


def test_load_refuses_a_mismatched_adapter(tmp_path):
    model = add_adapters(tiny_trm(), AdapterConfig(method="lora", rank=4))
    save_adapter(model, tmp_path)
    other = add_adapters(tiny_trm(), AdapterConfig(method="lora", rank=4, target_modules=["qkv_proj"]))
    with pytest.raises(AdapterConfigError, match="does not fit"):
        load_adapter(other, tmp_path)


@pytest.mark.parametrize("adapter_bits", [16, 32])
def test_int8_base_forward_is_close(adapter_bits):
    # One net application per step: the recursion would amplify rounding (and flip near-tie expert routes).
    base = tiny_trm(H_cycles=1, L_cycles=1).eval()
    model = add_adapters(copy.deepcopy(base), AdapterConfig(method="poly", rank=4)).eval()
    randomize_adapters(model, scale=0.05)
    batch = make_batch()
    ref = trm_logits(model, batch)
    _, total = count_parameters(model)
    dequantized = copy.deepcopy(model)  # the same model with each base weight rounded to what int8 can hold
    quantize_adapter_model(model, bits=8, adapter_bits=adapter_bits)
    q = model.net.layers[0].attn.qkv_proj
    assert isinstance(q.base_layer, Int8Linear) and q.base_layer.weight.dtype == torch.int8
    assert isinstance(model.lm_head, Int8Linear)  # frozen non-adapted linears too
    assert q.lora_A.weight.dtype == (torch.bfloat16 if adapter_bits == 16 else torch.float32)
    assert count_parameters(model)[1] == total
    got = trm_logits(model, batch)
    assert torch.isfinite(got).all()
    assert (got - ref).norm() / ref.norm() < 0.1  # close to the full-precision model
    if adapter_bits == 32:  # and exactly the model with int8-rounded weights, up to float rounding
        int8_of = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
        with torch.no_grad():
            for n, m in dequantized.named_modules():
                if n in int8_of:
                    w = int8_of[n].dequantize()
                    m.weight.copy_(w.T if getattr(m, "nf", None) else w)
        torch.testing.assert_close(got, trm_logits(dequantized, batch), atol=1e-4, rtol=1e-4)
    # adapters still train over the int8 base
    model.train()
    _, out = model(model.initial_carry(batch), batch)
    out.loss.backward()
    assert q.lora_B.weight.grad is not None and q.lora_B.weight.grad.abs().sum() > 0


def test_quantize_refuses_a_model_it_would_leave_unquantised():
    """quantize_adapter_model used to return a model without adapters (or with a trainable base) unchanged, without
    a word; it now says in one line why there is nothing to quantise, and changes nothing."""
    plain = tiny_trm()
    with pytest.raises(AdapterConfigError) as info:
        quantize_adapter_model(plain)
    assert "no adapters" in str(info.value) and "\n" not in str(info.value)
    trainable_base = add_adapters(tiny_trm(), AdapterConfig(method="lora", rank=2, freeze_base=False))
    with pytest.raises(AdapterConfigError) as info:
        quantize_adapter_model(trainable_base)
    assert "freeze_base=True" in str(info.value) and "\n" not in str(info.value)
    for model in (plain, trainable_base):
        assert not any(isinstance(m, Int8Linear) for m in model.modules())
        assert all(p.dtype == torch.float32 for p in model.parameters())
    quantized = quantize_adapter_model(add_adapters(tiny_trm(), AdapterConfig(method="lora", rank=2)))
    assert quantize_adapter_model(quantized) is quantized  # a second call finds it quantised already: fine


def test_int8_linear_error_is_small():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    q = Int8Linear.from_layer(layer)
    x = torch.randn(8, 64)
    assert (q(x) - layer(x)).abs().max() < 0.01 * layer(x).abs().max()
    conv = conv1d(64, 32)
    torch.testing.assert_close(Int8Linear.from_layer(conv)(x), conv(x), atol=0.02, rtol=0.02)


# ---- bad configs ----

@pytest.mark.parametrize("kwargs, field", [
    (dict(method="lora", rank=-1), "rank"),
    (dict(method="lora", rank=0), "rank"),
    (dict(method="moe", num_experts=2, top_k=3), "top_k"),
    (dict(method="bitfit"), "method"),
    (dict(method="hybrid", bottleneck_activation="swishy"), "bottleneck_activation"),
    (dict(method="lora", dropout=1.5), "dropout"),
    (dict(method="lora", rank_pattern={"o_proj": -1}), "rank_pattern"),
])
def test_bad_config_fails_with_one_clear_line(kwargs, field):
    with pytest.raises(AdapterConfigError) as info:
        AdapterConfig(**kwargs)
    msg = str(info.value)
    assert field in msg and "\n" not in msg
    assert isinstance(info.value, ValueError)


def test_unknown_target_module_names_what_exists():
    with pytest.raises(AdapterConfigError) as info:
        add_adapters(tiny_trm(), AdapterConfig(method="lora", target_modules=["q_prj"]))
    msg = str(info.value)
    assert "q_prj" in msg and "qkv_proj" in msg and "\n" not in msg
    with pytest.raises(AdapterConfigError, match="unknown field"):
        AdapterConfig.from_dict({"method": "lora", "rnak": 4})
    with pytest.raises(AdapterConfigError, match="already has adapters"):
        add_adapters(add_adapters(tiny_trm(), AdapterConfig(method="lora")), AdapterConfig(method="lora"))


# ---- adaptation actually trains ----

@pytest.mark.parametrize("method", ["lora", "poly", "hybrid"])
def test_adapters_train_a_frozen_trm(method):
    model = add_adapters(tiny_trm(), AdapterConfig(method=method, rank=4, bottleneck_size=8))
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert "puzzle_embedding.weight" in frozen
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and count_parameters(model)[0] == sum(p.numel() for p in params)
    opt = torch.optim.Adam(params, lr=1e-2)
    batch = make_batch(8, seed=5)
    losses = []
    for _ in range(12):
        _, out = model(model.initial_carry(batch), batch)
        aux = adapter_aux_loss(model)
        loss = out.loss / 8 + (aux if aux is not None else 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"


def test_activation_checkpointing_counts_the_router_loss_once():
    # Checkpointing re-runs the forward inside backward; the aux loss and gradients must be the same as without.
    results = []
    for ckpt in (False, True):
        model = add_adapters(tiny_trm(gradient_checkpointing=ckpt), AdapterConfig(method="poly", rank=4))
        randomize_adapters(model)
        batch = make_batch()
        _, out = model(model.initial_carry(batch), batch)
        aux = adapter_aux_loss(model)
        (out.loss + aux).backward()
        assert adapter_aux_loss(model) is None  # the recomputation added nothing
        results.append((aux.detach(), model.net.layers[0].attn.qkv_proj.router.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "ia3", "moe", "poly", "hybrid"])
def test_bf16_autocast_trains_and_tracks_fp32(method):
    """Under autocast the base output is bf16 while the adapter weights stay fp32: the in-place adds must cast
    (autocast does not cover in-place ops), and the result must track the fp32 forward.

    top_k = num_experts: every token uses every expert, so no routing decision can flip between bf16 and fp32.
    A near-tie flipped by rounding swaps an expert's whole contribution (rows so flipped move by 0.65-0.95): with
    top_k=2 that put the moe check at 0.041, against ~0.01 here. Routing under bf16 is checked on its own, with a
    derived bound, in test_bf16_routing_differs_from_fp32_only_at_near_ties."""
    cfg = AdapterConfig(method=method, rank=4, bottleneck_size=8, num_experts=4, top_k=4)
    model = add_adapters(tiny_trm(H_cycles=1, L_cycles=1), cfg)
    randomize_adapters(model, scale=0.05)
    batch = make_batch()
    with torch.no_grad():
        ref = trm_logits(model.eval(), batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = trm_logits(model, batch).float()
        _, out = model.train()(model.initial_carry(batch), batch)
    aux = adapter_aux_loss(model)
    (out.loss + (aux if aux is not None else 0)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    # bf16 keeps 8 significant bits: one rounding is off by at most u = 2^-8 = 3.9e-3 relative. These logits come
    # out of ~25 bf16 matmuls in series (4 block applications x 6, and the head); errors of order u each, if
    # independent, add in quadrature to ~sqrt(25) u = 0.02. Measured 0.006-0.018 over 10 seeds for every method
    # (0.007-0.011 with these). 0.04 is 2x that estimate and still well below what a lost or mis-scaled adapter
    # delta does: dropping the adapters moves these logits by 0.08 (IA3) to 1.2 (poly).
    assert (got - ref).norm() / ref.norm() < 0.04


def test_bf16_routing_differs_from_fp32_only_at_near_ties():
    """Under autocast the router's logits are bf16. A token whose k-th and (k+1)-th logits are closer than their
    rounding error may pick another expert: a legitimate difference of a discontinuous function. Every other token
    must pick the same experts as in fp32 and get the same output up to bf16 rounding."""
    torch.manual_seed(0)
    layer = PolyAdapter(nn.Linear(64, 32), rank=4, use_lora=False, use_moe=True, num_experts=8, top_k=2)
    randomize_adapters(layer, scale=0.1)
    x = torch.randn(512, 64)
    u = 2.0 ** -8  # bf16's largest relative rounding error (8 significant bits)
    with torch.no_grad():
        ref, (_, logits, top) = layer(x), layer.route(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, (_, _, top_bf16) = layer(x).float(), layer.route(x)
    # A logit x.w computed from bf16-rounded x and w (each off by <= u), then rounded itself, is off by at most
    # 2u sum|x_i w_i| + u |x.w| (fp32 accumulation adds ~1e-7 relative). The k-th / (k+1)-th order cannot flip
    # when their gap exceeds the sum of their two bounds.
    bound = 2 * u * (x.abs() @ layer.router.weight.abs().T) + u * logits.abs()  # (N, E)
    ranked, order = logits.sort(-1, descending=True)
    k = layer.top_k
    margin = bound.gather(1, order[:, k - 1 : k + 1]).sum(-1)
    decisive = ranked[:, k - 1] - ranked[:, k] > margin
    assert decisive.float().mean() > 0.7  # most tokens: the check below is about them (~80% here)
    same = (top.sort(-1).values == top_bf16.sort(-1).values).all(-1)
    assert same[decisive].all(), f"{int((~same & decisive).sum())} decisive tokens changed experts under bf16"
    # Their rows: a handful of roundings in series (x, the weights, the expert down-projection, the gates, the
    # output), each <= u: 5u = 0.02. Measured <= 0.009 (median 0.004); a flipped token's row moves by 0.65-0.95.
    rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert rel[decisive].max() < 5 * u, float(rel[decisive].max())


def test_autocast_saves_one_copy_of_the_input():
    """Under autocast every matmul casts its fp32 input to bf16 and saves that copy for backward; a poly layer's
    base, LoRA, router and experts would keep four. The layer casts once, so one bf16 copy is saved."""
    layer = PolyAdapter(nn.Linear(64, 96), rank=4, use_lora=True, use_ia3=True, use_moe=True, num_experts=4, top_k=2)
    layer.base_layer.requires_grad_(False)
    x = torch.randn(3, 7, 64, requires_grad=True)
    copies = set()

    def pack(t):
        if t.dtype == torch.bfloat16 and t.numel() == x.numel():
            copies.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert len(copies) == 1 and x.grad is not None


@pytest.mark.parametrize("parts", [dict(use_lora=False), dict(use_lora=True, use_moe=True)], ids=["ia3", "poly"])
def test_ia3_recompute_gives_the_same_gradients_and_saves_no_base_output(parts):
    """ia3_recompute=True recomputes base(x) in backward for IA3's gradient: same output and gradients, and the
    (tokens, out) base output is no longer among the tensors saved for backward."""
    x = torch.randn(5, 7, 16)
    results, saved = [], []
    for recompute in (False, True):
        torch.manual_seed(0)
        layer = PolyAdapter(nn.Linear(16, 48), rank=4, use_ia3=True, ia3_recompute=recompute, **parts)
        layer.base_layer.requires_grad_(False)
        with torch.no_grad():
            layer.ia3_l.uniform_(0.5, 1.5)
            if layer.lora_B is not None:
                layer.lora_B.weight.normal_(std=0.1)
        xi = x.clone().requires_grad_(True)
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            y = layer(xi)
        (y * torch.linspace(-1, 1, 48)).sum().backward()
        results.append([y.detach(), xi.grad] + [p.grad for p in layer.adapter_parameters()])
        saved.append(shapes)
    for plain, recomputed in zip(*results):
        torch.testing.assert_close(recomputed, plain, rtol=1e-6, atol=1e-6)
    assert (35, 48) in saved[0] and (35, 48) not in saved[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["lora", "poly", "hybrid"])
def test_cuda_bf16_autocast_and_int8_base(method):
    base = tiny_trm(H_cycles=1, L_cycles=1).eval()  # no recursion to amplify rounding
    batch = {k: v.cuda() for k, v in make_batch().items()}
    ref_model = add_adapters(copy.deepcopy(base), AdapterConfig(method=method, rank=4, bottleneck_size=8))
    randomize_adapters(ref_model, scale=0.05)
    model = copy.deepcopy(ref_model).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, out = model.train()(model.initial_carry(batch), batch)
    aux = adapter_aux_loss(model)
    (out.loss + (aux if aux is not None else 0)).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        ref = trm_logits(ref_model.cpu(), {k: v.cpu() for k, v in batch.items()})
        got = trm_logits(model.eval(), batch).float().cpu()
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)  # fp32 on the GPU == fp32 on the CPU
        quantize_adapter_model(model, bits=8, adapter_bits=16)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            q = trm_logits(model, batch).float().cpu()
    assert torch.isfinite(q).all() and (q - ref).norm() / ref.norm() < 0.1


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten ops a forward runs, views and metadata left out: on a GPU each one is a kernel launch."""

    VIEWS = {"view", "_unsafe_view", "reshape", "t", "transpose", "expand", "permute", "unsqueeze", "squeeze",
             "detach", "alias", "slice", "select", "as_strided"}

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.VIEWS:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def _extra_ops(layer: PolyAdapter, x: torch.Tensor, grad: bool = False) -> list[str]:
    x2 = x.reshape(-1, x.shape[-1])  # the adapter runs its base layer on the flattened tokens
    with torch.set_grad_enabled(grad), _CountOps() as wrapped:
        layer(x)
    with torch.no_grad(), _CountOps() as base:
        layer.base_layer(x2)
    assert wrapped.ops[: len(base.ops)] == base.ops
    return wrapped.ops[len(base.ops):]


def test_adapter_forward_adds_few_kernels():
    """Rank-8 adapters are launch-bound, not FLOP-bound: LoRA must cost exactly two extra kernels (x A^T, then one
    addmm_ adding s (x A^T) B^T into the base output in place), IA3 one, and the routed experts a fixed handful
    (router, top-k, softmax, gates, one down- and one up-projection), however many experts there are."""
    x = torch.randn(2, 5, 16)
    assert _extra_ops(PolyAdapter(nn.Linear(16, 32), rank=4), x) == ["mm", "addmm_"]
    assert _extra_ops(PolyAdapter(nn.Linear(16, 32), use_lora=False, use_ia3=True), x) == ["mul"]
    for experts in (4, 16):
        ops = _extra_ops(PolyAdapter(nn.Linear(16, 32), use_lora=False, use_moe=True, num_experts=experts), x)
        assert len(ops) <= 8 and ops.count("mm") == 2 and ops[-1] == "addmm_", ops
    # A bf16 layer runs the same kernels: no per-call casts of the logits or gates (router_loss casts once).
    bf16 = PolyAdapter(nn.Linear(16, 32).bfloat16(), use_lora=False, use_moe=True)
    assert "_to_copy" not in _extra_ops(bf16, x.bfloat16()) and len(_extra_ops(bf16, x.bfloat16())) <= 8


def test_router_loss_never_waits_for_the_device_and_does_not_grow_with_layers():
    """In training the router loss is deferred: the forward runs exactly the inference kernels, and the loss of
    all layers is computed at once when popped, with a kernel count that does not grow with the number of
    layers and nothing that forces a GPU->CPU sync (bincount, nonzero, .item() all do)."""
    layer = PolyAdapter(nn.Linear(16, 32), use_lora=True, use_moe=True, num_experts=4, top_k=2)
    x = torch.randn(2, 5, 16)
    assert _extra_ops(layer, x, grad=True) == _extra_ops(layer, x, grad=False)
    layer.pop_aux_loss()

    def aux_ops(num_layers: int) -> list[str]:
        torch.manual_seed(0)
        stack = nn.Sequential(*[PolyAdapter(nn.Linear(16, 16), use_moe=True, num_experts=4, top_k=2)
                                for _ in range(num_layers)])
        stack(x)
        with _CountOps() as counted:
            assert adapter_aux_loss(stack) is not None
        return counted.ops

    few, many = aux_ops(2), aux_ops(8)
    assert not {"bincount", "nonzero", "_local_scalar_dense", "item", "unique"} & set(many), many
    assert len(many) == len(few) <= 16, (few, many)


def test_router_loss_of_many_layers_equals_the_per_call_formula():
    """The stacked computation over every call of every layer equals the plain per-call definition, summed."""
    torch.manual_seed(0)
    layers = nn.Sequential(*[PolyAdapter(nn.Linear(16, 16), use_moe=True, num_experts=5, top_k=2,
                                         router_aux_weight=0.3, router_z_weight=0.07) for _ in range(3)])
    for layer in layers:
        randomize_adapters(layer, scale=0.5)
    x1, x2 = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    expected = 0.0
    with torch.no_grad():
        for x in (x1, x2):  # two forwards before one pop: both count
            h = x.reshape(-1, 16)
            for layer in layers:
                logits = layer.router(h)
                probs = logits.softmax(-1)
                slots = torch.bincount(logits.topk(2, dim=-1).indices.reshape(-1), minlength=5).float() / (h.shape[0] * 2)
                expected = expected + 0.3 * 5 * (slots * probs.mean(0)).sum()
                expected = expected + 0.07 * torch.logsumexp(logits, -1).square().mean()
                h = layer(h)
    layers(x1)
    layers(x2)
    torch.testing.assert_close(adapter_aux_loss(layers), expected, rtol=1e-5, atol=1e-6)
    assert adapter_aux_loss(layers) is None
    load = layers[0].last_expert_load  # still there after the pop, for logging: the last call's routing
    assert load.shape == (5,) and torch.isclose(load.sum(), torch.tensor(1.0))
