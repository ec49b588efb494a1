"""Stablemax / softmax cross-entropy against plain float64 references, and the deep-supervision loss + metrics."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from athena.models.trm.losses import deep_supervision_loss, softmax_cross_entropy, stablemax_cross_entropy


def stablemax_ce_reference(logits: np.ndarray, labels: np.ndarray, ignore_index: int = -100) -> np.ndarray:
    """Written out element by element in float64."""
    out = np.zeros(labels.shape, dtype=np.float64)
    for idx in np.ndindex(labels.shape):
        if labels[idx] == ignore_index:
            continue
        s = [x + 1.0 if x >= 0 else 1.0 / (1.0 - x) for x in logits[idx].astype(np.float64)]
        out[idx] = -(math.log(s[labels[idx]]) - math.log(sum(s)))
    return out


def softmax_ce_reference(logits: np.ndarray, labels: np.ndarray, ignore_index: int = -100) -> np.ndarray:
    """-log(exp(x_y) / sum_j exp(x_j)), written out element by element in float64."""
    out = np.zeros(labels.shape, dtype=np.float64)
    for idx in np.ndindex(labels.shape):
        if labels[idx] == ignore_index:
            continue
        x = [float(v) for v in logits[idx]]
        out[idx] = -(x[labels[idx]] - math.log(sum(math.exp(v) for v in x)))
    return out


def supervision_loss_reference(logits, labels, q_halt_logits, token_reference, halt_loss_weight=0.5) -> float:
    """sum over the batch of (mean token loss over labelled cells + w * BCE(q, sequence exactly right)), float64."""
    logits, labels, q = logits.double().numpy(), labels.numpy(), q_halt_logits.double().numpy()
    valid = labels != -100
    token = token_reference(logits, labels)
    lm = token.sum(-1) / np.maximum(valid.sum(-1), 1)
    exact = ((logits.argmax(-1) == labels) | ~valid).all(-1)
    bce = np.logaddexp(0.0, q) - q * exact  # -[t log sigmoid(q) + (1-t) log(1 - sigmoid(q))]
    return float((lm + halt_loss_weight * bce).sum())


def test_stablemax_ce_matches_reference_with_ignored_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 5, generator=g) * 4
    logits[0, 0] = torch.tensor([0.0, 1.0, -1.0, 50.0, -50.0])  # the branch points and far tails
    labels = torch.randint(0, 5, (3, 7), generator=g)
    labels[1, 2] = labels[2, 6] = -100
    got = stablemax_cross_entropy(logits, labels)
    assert got.dtype == torch.float64 and got.shape == (3, 7)
    expected = stablemax_ce_reference(logits.numpy(), labels.numpy())
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert got[1, 2] == 0 and got[2, 6] == 0


def test_stablemax_ce_gradients_are_finite_everywhere():
    # x = 1 makes the unused 1/(1-x) branch infinite; a naive torch.where would give nan gradients here.
    logits = torch.tensor([[[1.0, 0.0, -1.0, 1e4, -1e4]], [[1.0, 1.0, 1.0, 1.0, 1.0]]], requires_grad=True)
    labels = torch.tensor([[0], [-100]])
    stablemax_cross_entropy(logits, labels).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[1] == 0).all()  # ignored position: no gradient
    # Gradient vs a float64 finite-difference check on random logits.
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (2, 3))
    assert torch.autograd.gradcheck(lambda t: stablemax_cross_entropy(t, y), (x,))


def test_softmax_ce_matches_torch_and_ignores():
    logits = torch.randn(2, 5, 6)
    labels = torch.randint(0, 6, (2, 5))
    labels[0, 0] = -100
    got = softmax_cross_entropy(logits, labels)
    expected = -torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected[0, 0] = 0
    torch.testing.assert_close(got, expected)


def test_deep_supervision_loss_value_and_metrics():
    vocab = 4
    labels = torch.tensor([[1, 2, -100], [3, 3, 3], [-100, -100, -100], [0, 1, 2]])
    logits = torch.full((4, 3, vocab), -2.0)
    for b in range(4):  # sequences 0 and 2 exactly right, 1 has one error, 3 entirely wrong
        for t in range(3):
            target = labels[b, t].item()
            wrong = b == 3 or (b == 1 and t == 0)
            logits[b, t, (target + 1) % vocab if wrong else max(target, 0)] = 3.0
    q = torch.tensor([2.0, -1.0, 0.5, 1.0])
    halted = torch.tensor([True, True, True, False])
    steps = torch.tensor([3, 2, 5, 1], dtype=torch.int32)

    loss, m = deep_supervision_loss(logits, labels, q, halted, steps, "stablemax", halt_loss_weight=0.5)

    token = stablemax_ce_reference(logits.numpy(), labels.numpy())
    n_valid = np.array([2, 3, 0, 3])
    lm = token.sum(-1) / np.maximum(n_valid, 1)
    exact = np.array([1.0, 0.0, 1.0, 0.0])  # no labels counts as exact (all 0 labelled cells right)
    bce = F.binary_cross_entropy_with_logits(q, torch.tensor(exact, dtype=torch.float32), reduction="none").numpy()
    np.testing.assert_allclose(loss.item(), (lm + 0.5 * bce).sum(), rtol=1e-5)
    assert loss.dtype == torch.float32

    # metrics: slots 0 and 1 only (slot 2 has no labels, slot 3 did not halt)
    assert m["count"].item() == 2
    np.testing.assert_allclose(m["accuracy"].item(), 1.0 + 2 / 3, rtol=1e-6)
    assert m["exact_accuracy"].item() == 1
    assert m["q_halt_accuracy"].item() == 2  # q>0 & exact, q<0 & not exact
    assert m["steps"].item() == 5
    np.testing.assert_allclose(m["lm_loss"].item(), lm[:2].sum(), rtol=1e-5)
    np.testing.assert_allclose(m["q_halt_loss"].item(), bce[:2].sum(), rtol=1e-5)
    assert all(v.dtype == torch.float32 and v.ndim == 0 for v in m.values())


def test_softmax_loss_type_matches_a_hand_computed_reference_and_differs_from_stablemax():
    """loss_type="softmax" computes softmax cross-entropy, and stablemax its own: on these logits the two
    differ by far more than the tolerance, so one standing in for the other fails here."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 5, generator=g) * 3
    labels = torch.randint(0, 5, (4, 6), generator=g)
    labels[0, :2] = labels[3, :] = -100  # a partly and a fully unlabelled sequence
    labels[1] = logits[1].argmax(-1)  # one sequence exactly right: its halt target is 1
    q = torch.randn(4, generator=g)
    halted = torch.ones(4, dtype=torch.bool)
    steps = torch.full((4,), 2, dtype=torch.int32)
    for loss_type, reference, other in (("softmax", softmax_ce_reference, stablemax_ce_reference),
                                        ("stablemax", stablemax_ce_reference, softmax_ce_reference)):
        loss, m = deep_supervision_loss(logits, labels, q, halted, steps, loss_type, halt_loss_weight=0.5)
        expected = supervision_loss_reference(logits, labels, q, reference)
        # float32 result of float32 (softmax) or float64 (stablemax) token losses summed over 4 sequences:
        # a few float32 ulps of a value ~10.
        np.testing.assert_allclose(loss.item(), expected, rtol=1e-6)
        assert abs(expected - supervision_loss_reference(logits, labels, q, other)) > 1e-2 * abs(expected)
        token = reference(logits.numpy(), labels.numpy())
        lm = token.sum(-1) / np.maximum((labels != -100).sum(-1).numpy(), 1)
        np.testing.assert_allclose(m["lm_loss"].item(), lm[:3].sum(), rtol=1e-6)  # slot 3 has no labels


@pytest.mark.parametrize("loss_type", ["softmax", "stablemax"])
def test_trm_uses_the_loss_type_it_was_built_with(loss_type):
    """The model's loss_type (arch.loss_type) reaches the loss: its loss equals the hand-computed reference of
    that type on its own logits and halting logits."""
    from helpers import make_batch, small_model

    model = small_model(loss_type=loss_type)
    batch = make_batch(3, seed=5)
    _, out = model(model.initial_carry(batch), batch)
    reference = softmax_ce_reference if loss_type == "softmax" else stablemax_ce_reference
    other = stablemax_ce_reference if loss_type == "softmax" else softmax_ce_reference
    logits, q = out.logits.detach(), out.q_halt_logits.detach()
    expected = supervision_loss_reference(logits, batch["labels"], q, reference)
    np.testing.assert_allclose(out.loss.item(), expected, rtol=1e-6)  # float32 round-off of a sum of 3 terms
    assert abs(expected - supervision_loss_reference(logits, batch["labels"], q, other)) > 1e-3 * abs(expected)


def test_config_loss_type_reaches_the_model():
    """arch.loss_type in the Hydra config is what the built model computes."""
    from types import SimpleNamespace

    from athena.config import compose_config, validate_config
    from athena.models.build import build_model

    for loss_type in ("softmax", "stablemax"):
        overrides = ["arch.hidden_size=16", "arch.num_heads=2", f"arch.loss_type={loss_type}"]
        cfg = validate_config(compose_config(overrides))
        model = build_model(cfg, SimpleNamespace(vocab_size=6, seq_len=4, num_puzzle_identifiers=2))
        assert model.loss_type == loss_type


def test_deep_supervision_metrics_match_a_reference_on_edge_cases():
    """Metrics summed over the slots that halted and have labels, on sequences with 0, 1 and several labelled
    cells and halting logits on both sides of 0 and of 1 (the threshold is 0)."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 4, 5, generator=g) * 2
    labels = torch.randint(0, 5, (6, 4), generator=g)
    labels[0] = logits[0].argmax(-1)  # exactly right
    labels[1, 1:] = -100  # one labelled cell, predicted right: exact
    labels[1, 0] = logits[1, 0].argmax()
    labels[2, :3] = -100  # one labelled cell, predicted wrong
    labels[2, 3] = (logits[2, 3].argmax() + 1) % 5
    labels[3] = -100  # no labels: never counted
    q = torch.tensor([0.5, -0.5, -0.7, 2.0, -2.0, 1.5])
    halted = torch.tensor([True, True, True, True, True, False])
    steps = torch.tensor([1, 2, 3, 4, 5, 6], dtype=torch.int32)
    loss, m = deep_supervision_loss(logits, labels, q, halted, steps, "stablemax", halt_loss_weight=0.5)

    lg, lb, qn = logits.double().numpy(), labels.numpy(), q.double().numpy()
    valid = lb != -100
    n_valid = valid.sum(-1)
    correct = (lg.argmax(-1) == lb) & valid
    exact = correct.sum(-1) == n_valid
    lm = stablemax_ce_reference(lg, lb).sum(-1) / np.maximum(n_valid, 1)
    bce = np.logaddexp(0.0, qn) - qn * exact
    done = halted.numpy() & (n_valid > 0)
    assert list(done) == [True, True, True, False, True, False]
    expected = {"count": done.sum(), "accuracy": (correct.sum(-1) / np.maximum(n_valid, 1))[done].sum(),
                "exact_accuracy": exact[done].sum(), "q_halt_accuracy": ((qn > 0) == exact)[done].sum(),
                "steps": steps.numpy()[done].sum(), "lm_loss": lm[done].sum(), "q_halt_loss": bce[done].sum()}
    assert expected["exact_accuracy"] == 2 and expected["q_halt_accuracy"] == 3  # slots 0, 1 exact; q > 0 on 0
    for name, value in expected.items():
        np.testing.assert_allclose(m[name].item(), value, rtol=1e-6, err_msg=name)  # float32 sums of a few terms
    np.testing.assert_allclose(loss.item(), (lm + 0.5 * bce).sum(), rtol=1e-6)
