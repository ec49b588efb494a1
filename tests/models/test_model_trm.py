"""TinyRecursiveModel: shapes, the 1-step gradient, parameter counts, halting/ACT, carry bookkeeping, sparse grads."""

import math

import pytest
import torch

from athena.models import TinyRecursiveModel
from athena.models.trm.layers import swiglu_intermediate_size
from helpers import NUM_IDS, SEQ, VOCAB, make_batch, small_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.mark.parametrize("mixer", ["attention", "mlp"])
@pytest.mark.parametrize("puzzle_emb_len", [0, 2])
def test_output_and_carry_shapes(mixer, puzzle_emb_len):
    model = small_model(mixer=mixer, puzzle_emb_len=puzzle_emb_len)
    batch = make_batch(5, seed=0)
    carry = model.initial_carry(batch)
    assert carry.halted.all() and carry.steps.dtype == torch.int32
    carry, out = model(carry, batch)
    assert out.logits.shape == (5, SEQ, VOCAB)
    assert out.q_halt_logits.shape == (5,) and out.q_halt_logits.dtype == torch.float32
    assert carry.z_H.shape == carry.z_L.shape == (5, puzzle_emb_len + SEQ, 32)
    assert carry.steps.shape == (5,) and carry.steps.dtype == torch.int32 and (carry.steps == 1).all()
    assert carry.halted.shape == (5,) and carry.halted.dtype == torch.bool
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    metric_names = {"count", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps", "lm_loss", "q_halt_loss"}
    assert set(out.metrics) == metric_names
    assert (model.puzzle_embedding is None) == (puzzle_emb_len == 0)


def test_post_norm_states_are_rms_normalised():
    # Post-norm: the last op of the network is an RMSNorm without weight, so every carried vector has RMS 1.
    for mixer in ("attention", "mlp"):
        model = small_model(mixer=mixer)
        batch = make_batch(3, seed=1)
        carry, _ = model(model.initial_carry(batch), batch)
        for state in (carry.z_H, carry.z_L):
            rms = state.square().mean(-1).sqrt()
            torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-4, rtol=0)


def test_only_last_H_cycle_builds_a_graph():
    H, L = 3, 2
    model = small_model(H_cycles=H, L_cycles=L)
    calls = []
    model.net.register_forward_hook(lambda module, args, output: calls.append(torch.is_grad_enabled()))
    batch = make_batch(2, seed=0)
    model(model.initial_carry(batch), batch)
    assert len(calls) == H * (L + 1)
    assert sum(calls) == L + 1
    assert calls[-(L + 1) :] == [True] * (L + 1)  # the graph is the LAST cycle


def test_gradients_reach_parameters_but_not_the_carry():
    model = small_model()
    batch = make_batch(4, seed=0)
    carry, out = model(model.initial_carry(batch), batch)
    assert not carry.z_H.requires_grad and not carry.z_L.requires_grad
    out.loss.backward()
    dense, sparse = model.param_groups()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        g = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
        assert torch.isfinite(g).all(), name
    # q_head.weight starts at zero but still gets a gradient; every network weight gets a non-zero one
    for name, p in model.net.named_parameters():
        assert p.grad.abs().sum() > 0, name
    # A second step starting from the detached carry backpropagates on its own (no "backward twice" error).
    model.zero_grad()
    carry, out = model(carry, batch)
    out.loss.backward()


def test_paper_parameter_counts():
    # TRM paper: attention variant ~7M (6.8M in the network), TRM-MLP on Sudoku (81 cells + 16 prefix) ~5M.
    with torch.device("meta"):
        att = TinyRecursiveModel(vocab_size=11, seq_len=81, num_puzzle_identifiers=1, mixer="attention")
        mlp = TinyRecursiveModel(vocab_size=11, seq_len=81, num_puzzle_identifiers=1, mixer="mlp")
    net_att = sum(p.numel() for p in att.net.parameters())
    net_mlp = sum(p.numel() for p in mlp.net.parameters())

    D = 512
    channel_mlp = 3 * D * swiglu_intermediate_size(D, 4.0)  # gate, up, down
    assert swiglu_intermediate_size(D, 4.0) == 1536 and swiglu_intermediate_size(97, 4.0) == 512
    assert net_att == 2 * (4 * D * D + channel_mlp) == 6_815_744
    assert net_mlp == 2 * (3 * 97 * 512 + channel_mlp) == 5_016_576
    heads = 2 * 11 * D + (2 * D + 2)  # token embedding + lm_head + q_head
    assert att.num_parameters() == net_att + heads
    assert mlp.num_parameters() == net_mlp + heads
    assert att.num_parameters(include_puzzle_embedding=True) == net_att + heads + 1 * D


def set_halt_bias(model, value: float):
    with torch.no_grad():
        model.q_head.bias[0] = value


def run_steps(model, batch, n):
    carry = model.initial_carry(batch)
    history = []
    for _ in range(n):
        carry, out = model(carry, batch)
        history.append((carry.steps.clone(), carry.halted.clone(), out))
    return carry, history


@pytest.mark.parametrize("halt_max_steps", [2, 5])  # 2: the smallest budget where the Q head has a say
def test_confident_q_head_halts_after_one_step_in_training(halt_max_steps):
    model = small_model(halt_max_steps=halt_max_steps)
    set_halt_bias(model, 20.0)
    _, history = run_steps(model, make_batch(6, seed=0), 2)
    for steps, halted, _ in history:
        assert halted.all() and (steps == 1).all()  # every call restarts every slot


def test_unconfident_q_head_runs_halt_max_steps():
    model = small_model(halt_max_steps=3)
    set_halt_bias(model, -20.0)
    _, history = run_steps(model, make_batch(6, seed=0), 6)
    assert [int(steps[0]) for steps, _, _ in history] == [1, 2, 3, 1, 2, 3]
    assert [bool(halted.all()) for _, halted, _ in history] == [False, False, True, False, False, True]
    assert all(halted.all() or not halted.any() for _, halted, _ in history)


def test_eval_mode_ignores_q_head_and_always_runs_halt_max_steps():
    model = small_model(halt_max_steps=3, halt_exploration_prob=1.0).eval()
    set_halt_bias(model, 20.0)
    _, history = run_steps(model, make_batch(6, seed=0), 3)
    assert [bool(halted.any()) for _, halted, _ in history] == [False, False, True]


def test_halt_max_steps_one_always_halts():
    model = small_model(halt_max_steps=1)
    set_halt_bias(model, -20.0)
    _, history = run_steps(model, make_batch(3, seed=0), 2)
    assert all(halted.all() and (steps == 1).all() for steps, halted, _ in history)


def binomial_tolerance(q: float, n: int) -> float:
    """4 standard deviations of a frequency with probability q over n draws: a correct implementation falls
    outside with probability ~6e-5 per check, whatever the seed."""
    return 4 * math.sqrt(q * (1 - q) / n)


@pytest.mark.parametrize("p", [1.0, 0.3])
def test_exploration_minimum_is_uniform_on_2_to_halt_max_steps(p):
    """With prob p a slot gets a random minimum number of steps, uniform on {2, ..., halt_max_steps}, redrawn at
    every step; a slot whose Q head says halt keeps running while its steps are below that minimum. So after s
    steps it keeps running with prob p * P(min > s) = p * (M - s) / (M - 1): each value's frequency is checked,
    so a minimum drawn from {1..M}, {2..M-1} or {3..M} (an off-by-one) fails."""
    M, B = 5, 20000  # 20000 draws per s: 4 sigma is <= 0.014; an off-by-one moves some frequency by >= 0.08 * p
    model = small_model(halt_max_steps=M, halt_exploration_prob=p)
    torch.manual_seed(7)
    wants_halt = torch.full((B,), 20.0)
    for s in range(1, M + 1):
        halted = model.decide_halt(torch.full((B,), s, dtype=torch.int32), wants_halt)
        running = (~halted).float().mean().item()
        expected = p * (M - s) / (M - 1)
        assert abs(running - expected) <= binomial_tolerance(expected, B), (s, running, expected)
    # The largest minimum, M, is drawn: some slots run on after M - 1 steps (expected p/(M-1) of them).
    assert not model.decide_halt(torch.full((B,), M - 1, dtype=torch.int32), wants_halt).all()
    # A Q head that says continue (a halting logit <= 0, as in the official TRM) runs every slot to M.
    for s in range(1, M + 1):
        for says_continue in (-wants_halt, torch.zeros(B)):
            halted = model.decide_halt(torch.full((B,), s, dtype=torch.int32), says_continue)
            assert bool(halted.all()) == (s == M) and bool(halted.any()) == (s == M)


def test_exploration_forces_a_random_minimum_number_of_steps():
    """The same through forward: the step at which each slot first halts follows from the per-step probabilities.
    (The exact distribution of the minimum is checked above on 20000 draws; 1000 slots keep this one ~2 s.)"""
    max_steps, p, B = 4, 0.5, 1000  # 4 sigma of a frequency over 1000 slots is <= 0.063
    model = small_model(hidden_size=16, num_heads=2, H_cycles=1, L_cycles=1, num_layers=1,
                        halt_max_steps=max_steps, halt_exploration_prob=p)  # fmt: skip
    set_halt_bias(model, 20.0)  # the Q head always wants to halt: only exploration can delay it
    torch.manual_seed(123)
    batch = make_batch(B, seed=0)
    carry = model.initial_carry(batch)
    finish = torch.zeros(B, dtype=torch.int32)
    with torch.no_grad():
        for _ in range(max_steps):
            carry, _ = model(carry, batch)
            finish = torch.where((finish == 0) & carry.halted, carry.steps, finish)
    assert (finish >= 1).all() and (finish <= max_steps).all()  # everybody halted by halt_max_steps
    # As in official TRM the exploration minimum is redrawn at every step: a slot that has taken s steps keeps
    # running with prob p * P(randint(2, max+1) > s) = p * (max - s) / (max - 1), and always stops at max.
    keep_running = [p * (max_steps - s) / (max_steps - 1) for s in range(1, max_steps + 1)]
    reach = 1.0
    for k in range(1, max_steps + 1):
        expected = reach * (1 - keep_running[k - 1])
        frequency = (finish == k).float().mean().item()
        assert abs(frequency - expected) <= binomial_tolerance(expected, B), (k, frequency, expected)
        reach *= keep_running[k - 1]
    assert (finish == max_steps).any()  # expected in 2.8% = 28 slots: a minimum that never reaches max fails


def test_halted_slots_take_new_data_and_fresh_state_running_slots_keep_theirs():
    model = small_model(halt_max_steps=10).eval()  # eval: deterministic, no early halting
    first, second = make_batch(4, seed=1), make_batch(4, seed=2)
    carry, _ = model(model.initial_carry(first), first)
    carry, _ = model(carry, first)  # every slot has run 2 steps on `first`
    carry.halted = torch.tensor([True, False, True, False])

    new_carry, out = model(carry, second)

    fresh = torch.tensor([True, False, True, False])
    for k in first:
        expected = torch.where(fresh.view(-1, *[1] * (first[k].ndim - 1)), second[k], first[k])
        assert torch.equal(new_carry.current_data[k], expected), k
    assert new_carry.steps.tolist() == [1, 3, 1, 3]

    # Restarted slots behave exactly like a brand-new run on `second`...
    _, fresh_out = model(model.initial_carry(second), second)
    torch.testing.assert_close(out.logits[fresh], fresh_out.logits[fresh])
    # ...and running slots exactly like continuing on `first` alone.
    carry.halted = torch.zeros(4, dtype=torch.bool)  # forward never mutates the carry it is given
    _, cont_out = model(carry, first)
    torch.testing.assert_close(out.logits[~fresh], cont_out.logits[~fresh])


def test_metrics_count_only_slots_that_halted_this_step():
    model = small_model(halt_max_steps=3).eval()
    batch = make_batch(5, seed=3)
    carry = model.initial_carry(batch)
    carry, out = model(carry, batch)
    assert all(v.item() == 0 for v in out.metrics.values())  # nobody halted after 1 of 3 steps

    carry.steps = torch.tensor([2, 0, 2, 0, 0], dtype=torch.int32)  # slots 0 and 2 are on their last step
    carry, out = model(carry, batch)
    assert carry.halted.tolist() == [True, False, True, False, False]
    m = out.metrics
    assert m["count"].item() == 2 and m["steps"].item() == 6
    assert 0 <= m["accuracy"].item() <= 2 and 0 <= m["exact_accuracy"].item() <= 2
    assert 0 <= m["q_halt_accuracy"].item() <= 2 and m["lm_loss"].item() > 0 and m["q_halt_loss"].item() > 0


def test_puzzle_embedding_gets_a_sparse_grad_on_batch_rows_only():
    model = small_model()
    batch = make_batch(4, seed=0)
    batch["puzzle_identifiers"] = torch.tensor([5, 2, 5, 0])
    _, out = model(model.initial_carry(batch), batch)
    out.loss.backward()
    grad = model.puzzle_embedding.weight.grad
    assert grad.is_sparse
    grad = grad.coalesce()
    assert grad.indices()[0].tolist() == [0, 2, 5]
    assert grad.values().abs().sum() > 0
    dense, sparse = model.param_groups()
    assert sparse == [model.puzzle_embedding.weight]
    assert all(p is not model.puzzle_embedding.weight for p in dense)
    assert len(dense) + len(sparse) == len(list(model.parameters()))


@pytest.mark.parametrize("mixer", ["attention", "mlp"])
def test_gradient_checkpointing_gives_the_same_gradients(mixer):
    plain = small_model(mixer=mixer)
    ckpt = small_model(mixer=mixer, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    batch = make_batch(3, seed=4)
    grads = []
    for model in (plain, ckpt):
        _, out = model(model.initial_carry(batch), batch)
        out.loss.backward()
        grads.append({n: p.grad.to_dense() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(H_cycles=0),
        dict(L_cycles=0),
        dict(hidden_size=30, num_heads=4),
        dict(halt_max_steps=0),
        dict(mixer="conv"),
        dict(loss_type="mse"),
        dict(halt_exploration_prob=1.5),
        dict(puzzle_emb_len=-1),
    ],
)
def test_bad_constructor_arguments_raise_a_clear_value_error(overrides):
    with pytest.raises(ValueError, match="TinyRecursiveModel: "):
        small_model(**overrides)


def test_softmax_loss_option_and_repr():
    model = small_model(loss_type="softmax")
    batch = make_batch(2, seed=0)
    _, out = model(model.initial_carry(batch), batch)
    assert torch.isfinite(out.loss)
    assert "mixer=attention" in repr(model) and "H_cycles=2" in repr(model)


@pytest.mark.parametrize("mixer", ["attention", "mlp"])
def test_padded_eval_batches_give_the_same_result_as_unpadded(mixer):
    """evaluate_puzzles(pad_to=) pads the short last batch (one shape for a compiled model); the padding rows must
    count nowhere: every metric and prediction equals the unpadded evaluation's."""
    from athena.eval.puzzle_eval import evaluate_puzzles, pad_rows

    model = small_model(mixer=mixer)
    batches = [make_batch(4, seed=1), make_batch(3, seed=2)]
    for batch in batches:
        batch["labels"][:, 1:] = -100  # one labelled cell per sequence, so some sequences are exact
        batch["labels"][:2, 0] = 3  # two certain misses
    padded = pad_rows(batches[1], 4)
    assert padded["labels"].shape == (4, SEQ) and (padded["labels"][3] == -100).all()
    assert (padded["inputs"][3] == 0).all() and torch.equal(padded["inputs"][:3], batches[1]["inputs"])

    def run(pad_to):
        loader = [{k: v.clone() for k, v in b.items()} for b in batches]
        return evaluate_puzzles(model, loader, torch.device("cpu"), halt_max_steps=4, keep_predictions=True,
                                pad_to=pad_to)

    plain, with_padding = run(None), run(4)
    assert with_padding.count == plain.count == 7
    assert 0 < plain.exact_accuracy < 1
    assert with_padding.summary() == plain.summary()  # sums of 0/1 counts: exact
    assert torch.equal(with_padding.predictions["prediction"], plain.predictions["prediction"])
    assert sum(with_padding.halt_step_counts) == 7
    assert not with_padding.predictions["q_halt_logit"].requires_grad  # evaluation builds no autograd graph
