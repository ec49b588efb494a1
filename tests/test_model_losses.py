"""Stablemax / softmax cross-entropy against plain float64 references, and the deep-supervision loss + metrics."""

import math

import numpy as np
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
