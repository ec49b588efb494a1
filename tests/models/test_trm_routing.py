"""arch.ffn_capacity: capacity routers on the channel FFN of TRM's blocks, inside the recursion (routing.py)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from athena.models.trm import TRMConfig
from athena.models.trm.layers import rms_norm
from athena.models.trm.routing import routed_count
from athena.training.optimizers import AdamAtan2
from helpers import SEQ, make_batch, small_model

TOTAL = 2 + SEQ  # small_model's puzzle_emb_len + puzzle cells: the positions the blocks see


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: one thread is as fast and does not stall when other processes load the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_capacity_one_is_the_dense_model_bit_for_bit():
    dense, explicit = small_model(), small_model(ffn_capacity=1.0)
    assert not any("router" in name for name, _ in explicit.named_parameters())  # no routers, same init draws
    assert all(torch.equal(a, b) for a, b in zip(dense.state_dict().values(), explicit.state_dict().values()))
    batch = make_batch(4, seed=0)
    _, out_a = dense(dense.initial_carry(batch), batch)
    _, out_b = explicit(explicit.initial_carry(batch), batch)
    assert torch.equal(out_a.logits, out_b.logits) and torch.equal(out_a.loss, out_b.loss)
    assert set(out_a.metrics) == set(out_b.metrics)  # no router metrics when nothing routes


@pytest.mark.parametrize("capacity", [0.25, 0.5, 0.75])
def test_capacity_routes_round_c_times_positions_per_sequence_and_application(capacity):
    model = small_model(ffn_capacity=capacity)
    rows = []
    for layer in model.net.layers:
        layer.mlp.register_forward_hook(lambda module, args, out: rows.append(args[0].shape))
    batch = make_batch(3, seed=0)
    _, out = model(model.initial_carry(batch), batch)
    k = routed_count(capacity, TOTAL)
    assert k == int(capacity * TOTAL + 0.5) and 0 < k < TOTAL
    applications = model.H_cycles * (model.L_cycles + 1) * model.num_layers
    assert rows == [torch.Size([3 * k, 32])] * applications  # gathered: (batch x k, hidden), every application
    assert out.metrics["realised_capacity"].item() == pytest.approx(k / TOTAL)


def test_skipped_positions_pass_the_ffn_step_unchanged_and_routed_ones_get_norm_of_residual():
    model = small_model(ffn_capacity=0.5)
    block = model.net.layers[0]
    h = torch.randn(2, TOTAL, 32)
    out = block.routed_ffn(h, block.mlp, block._norm)
    top = block.routed_ffn.router.scores(h).topk(routed_count(0.5, TOTAL), dim=-1).indices
    chosen = torch.zeros(2, TOTAL, dtype=torch.bool).scatter_(1, top, True)
    assert torch.equal(out[~chosen], h[~chosen])  # exactly: not even the post-norm touches them
    dense_step = rms_norm(h + block.mlp(h), block.eps)
    # Same ops on a gathered subset: equal up to float32 rounding of differently blocked matmuls.
    torch.testing.assert_close(out[chosen], dense_step[chosen], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[chosen], h[chosen])


def test_every_position_routed_equals_the_dense_step():
    """c just under 1 rounds to all positions: gather + scatter in top-k order must put every row back in place."""
    model = small_model(ffn_capacity=0.99)
    block = model.net.layers[1]
    assert routed_count(0.99, TOTAL) == TOTAL
    h = torch.randn(3, TOTAL, 32)
    torch.testing.assert_close(block.routed_ffn(h, block.mlp, block._norm), rms_norm(h + block.mlp(h), block.eps),
                               rtol=1e-5, atol=1e-5)  # float32 rounding of the row-permuted matmuls


def test_routers_and_every_other_weight_get_gradients_and_the_z_loss_joins_the_loss():
    weighted, unweighted = small_model(ffn_capacity=0.5), small_model(ffn_capacity=0.5, router_z_loss_weight=0.0)
    batch = make_batch(4, seed=1)
    _, out = weighted(weighted.initial_carry(batch), batch)
    out.loss.backward()
    for name, p in weighted.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert sum("router" in name for name, _ in weighted.named_parameters()) == 2 * 2  # weight + bias per block
    _, plain = unweighted(unweighted.initial_carry(batch), batch)
    z = out.metrics["router_z_loss"]
    assert z > 0
    # The loss is a sum over the batch: the z-loss joins it once per sample, with weight 1e-3 (ST-MoE).
    torch.testing.assert_close(out.loss - plain.loss, 4 * 1e-3 * z, rtol=1e-4, atol=1e-6)


def test_router_gradient_is_the_straight_through_estimate():
    """d loss / d score of a routed position = <d loss / d y, y> * sigmoid'(score): nonzero only where routed."""
    model = small_model(ffn_capacity=0.5)
    block = model.net.layers[0]
    h = torch.randn(2, TOTAL, 32)
    scores = {}
    original = block.routed_ffn.router.scores

    def keep(x):
        scores["s"] = original(x)
        scores["s"].retain_grad()
        return scores["s"]

    block.routed_ffn.router.scores = keep
    out = block.routed_ffn(h, block.mlp, block._norm)
    out.square().sum().backward()
    grad = scores["s"].grad
    chosen = torch.zeros(2, TOTAL, dtype=torch.bool).scatter_(1, scores["s"].topk(routed_count(0.5, TOTAL)).indices,
                                                              True)
    assert (grad[~chosen] == 0).all() and (grad[chosen] != 0).all()


@pytest.mark.parametrize("value,message", [
    (0.0, "ffn_capacity: Input should be greater than 0"),
    (1.5, "ffn_capacity: Input should be less than or equal to 1"),
    ("half", "ffn_capacity: Input should be a valid number"),
])
def test_bad_capacity_is_one_line(value, message):
    with pytest.raises(ValueError) as error:
        small_model(ffn_capacity=value)
    assert str(error.value).startswith(f"TinyRecursiveModel: {message}") and "\n" not in str(error.value)
    with pytest.raises(ValidationError):
        TRMConfig(ffn_capacity=value)


def test_negative_router_loss_weight_is_refused():
    with pytest.raises(ValueError, match="^TinyRecursiveModel: router_z_loss_weight: Input should be greater"):
        small_model(ffn_capacity=0.5, router_z_loss_weight=-1)


def test_routed_model_learns_a_held_out_token_map():
    """At c=0.5 a tiny TRM learns a per-cell map (digit -> permuted digit) and gets it right on fresh puzzles:
    the routed FFN and the rest of the recursion train together."""
    perm = torch.tensor([0, 1, 4, 2, 5, 3])  # token -> label; 2..5 are the digits (helpers.VOCAB = 6)

    def batch(n, seed):
        g = torch.Generator().manual_seed(seed)
        inputs = torch.randint(2, 6, (n, SEQ), generator=g)
        return {"inputs": inputs, "labels": perm[inputs], "puzzle_identifiers": torch.zeros(n, dtype=torch.long)}

    model = small_model(ffn_capacity=0.5, halt_max_steps=1, H_cycles=1, L_cycles=1, puzzle_emb_len=0)
    router_before = model.net.layers[0].routed_ffn.router.proj.weight.detach().clone()
    opt = AdamAtan2(model.param_groups()[0], lr=3e-3, weight_decay=0.0)

    def held_out_accuracy() -> float:
        model.eval()
        test = batch(64, seed=10_000)
        with torch.no_grad():
            _, out = model(model.initial_carry(test), test)
        model.train()
        return (out.logits.argmax(-1) == test["labels"]).float().mean().item()

    before = held_out_accuracy()
    losses = []
    for step in range(60):
        train = batch(32, seed=step)
        _, out = model(model.initial_carry(train), train)
        (out.loss / 32).backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.metrics["lm_loss"].item() / 32)
    after = held_out_accuracy()
    # Chance is 1/4 over the four digits; a map this simple is learnt nearly perfectly when training works.
    assert before < 0.5 and after > 0.9, (before, after)
    # Stablemax cross-entropy falls slowly once argmax is right (its tail is 1/(1-x), not exp): a 3x drop, not 10x.
    assert sum(losses[-5:]) < 0.33 * sum(losses[:5])
    assert not torch.equal(router_before, model.net.layers[0].routed_ffn.router.proj.weight)


def test_routers_and_the_recursion_memory_compose():
    # The two TRM options touch different halves of a Block (FFN vs attention): both on, each keeps its contract
    # (the FFN sees round(c x positions) rows per sequence, the memory's and routers' aux terms reach the loss) and
    # every parameter of both gets a gradient.
    model = small_model(mixer="attention", ffn_capacity=0.5, amrpa_window=2, amrpa_gate_init_strength=1.0).train()
    rows = []
    for layer in model.net.layers:
        layer.mlp.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    batch = make_batch(3, seed=0)
    _, out = model(model.initial_carry(batch), batch)
    assert set(rows) == {3 * routed_count(0.5, TOTAL)}
    assert "router_z_loss" in out.metrics and torch.isfinite(out.loss)
    out.loss.backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not [n for n in names if "router" in n or "memory" in n], names
