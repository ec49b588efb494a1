"""AdamAtan2 and SignSGD against updates written out plainly in numpy."""

import copy

import numpy as np
import pytest
import torch

from athena.training.optimizers import AdamAtan2, SignSGD


def adam_atan2_reference(p0, grads, lr, b1, b2, wd):
    p, m, v = p0.astype(np.float64), np.zeros_like(p0, np.float64), np.zeros_like(p0, np.float64)
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * np.arctan2(m / (1 - b1**t), np.sqrt(v / (1 - b2**t)))
    return p


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("wd", [0.3, 1.0])  # 1.0: the Sudoku/maze recipes' weight decay
def test_adam_atan2_matches_reference(foreach, tensor_lr, wd):
    lr, betas = 0.05, (0.8, 0.9)
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=g).requires_grad_(), torch.randn(5, generator=g).requires_grad_()]
    start = [p.detach().numpy().copy() for p in params]
    grads = [[torch.randn(p.shape, generator=g) for _ in range(5)] for p in params]
    grads[1][2].zero_()  # an all-zero gradient at a step: atan2(0, 0) = 0, no nan
    opt = AdamAtan2(params, lr=torch.tensor(lr) if tensor_lr else lr, betas=betas, weight_decay=wd, foreach=foreach)
    for step in range(5):
        for p, gs in zip(params, grads):
            p.grad = gs[step].clone()
        opt.step()
    for p, p0, gs in zip(params, start, grads):
        expected = adam_atan2_reference(p0, [x.numpy() for x in gs], lr, *betas, wd)
        np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_adam_atan2_skips_params_without_grad_and_rejects_sparse():
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = AdamAtan2([a, b], lr=0.1, weight_decay=0.5)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3)) and b not in opt.state
    emb = torch.nn.Embedding(4, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="SignSGD"):
        AdamAtan2(emb.parameters()).step()


def test_sign_sgd_sparse_updates_only_gradient_rows():
    lr, wd = 0.1, 0.5
    emb = torch.nn.Embedding(6, 3, sparse=True)
    before = emb.weight.detach().clone()
    ids = torch.tensor([4, 1, 4])
    weights = torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, -1.0], [-2.0, 1.0, 0.0]])  # row 4 grads sum to (-1,-1,0)
    (emb(ids) * weights).sum().backward()
    SignSGD(emb.parameters(), lr=lr, weight_decay=wd).step()
    after = emb.weight.detach()
    expected = before.clone()
    expected[1] = before[1] * (1 - lr * wd) - lr * torch.tensor([1.0, 1.0, -1.0])
    expected[4] = before[4] * (1 - lr * wd) - lr * torch.tensor([-1.0, -1.0, 0.0])
    torch.testing.assert_close(after, expected)
    untouched = [0, 2, 3, 5]
    assert torch.equal(after[untouched], before[untouched])


def test_sign_sgd_dense_grad_updates_all_rows():
    p = torch.randn(3, 2, requires_grad=True)
    before = p.detach().clone()
    p.grad = torch.tensor([[1.0, -1.0], [0.0, 2.0], [-3.0, 0.5]])
    SignSGD([p], lr=torch.tensor(0.01), weight_decay=0.1).step()
    torch.testing.assert_close(p.detach(), before * (1 - 0.001) - 0.01 * torch.sign(p.grad))


@pytest.mark.parametrize(
    "make_opt", [lambda ps: AdamAtan2(ps, lr=0.01, weight_decay=0.1), lambda ps: SignSGD(ps, lr=0.01)]
)
def test_state_dict_round_trip_gives_identical_continuation(make_opt):
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(4, 3, generator=g) for _ in range(6)]
    param = torch.randn(4, 3, generator=g).requires_grad_()
    opt = make_opt([param])

    def run(p, o, steps):
        for gr in steps:
            p.grad = gr.clone()
            o.step()

    run(param, opt, grads[:3])
    saved_param, saved_state = param.detach().clone(), copy.deepcopy(opt.state_dict())
    run(param, opt, grads[3:])

    resumed = saved_param.clone().requires_grad_()
    opt2 = make_opt([resumed])
    opt2.load_state_dict(saved_state)
    run(resumed, opt2, grads[3:])
    assert torch.equal(resumed.detach(), param.detach())


def test_defaults_are_trms():
    """Built without arguments, the optimisers use the official TRM's values; AdamAtan2 takes the batched
    torch._foreach_* path when torch has it (one kernel per op for all tensors instead of one per tensor)."""
    p = torch.zeros(2, requires_grad=True)
    adam = AdamAtan2([p]).param_groups[0]
    assert (adam["lr"], adam["betas"], adam["weight_decay"], adam["foreach"]) == (1e-4, (0.9, 0.95), 0.1, True)
    sign = SignSGD([p]).param_groups[0]
    assert (sign["lr"], sign["weight_decay"]) == (1e-2, 0.1)


@pytest.mark.parametrize("make, message", [
    (lambda ps: AdamAtan2(ps, lr=-1e-3), "AdamAtan2: lr must be >= 0"),
    (lambda ps: AdamAtan2(ps, betas=(1.0, 0.95)), r"AdamAtan2: betas must be in \[0, 1\)"),
    (lambda ps: AdamAtan2(ps, betas=(0.9, 1.0)), r"AdamAtan2: betas must be in \[0, 1\)"),
    (lambda ps: AdamAtan2(ps, betas=(-0.1, 0.95)), r"AdamAtan2: betas must be in \[0, 1\)"),
    (lambda ps: AdamAtan2(ps, betas=(0.9, -0.1)), r"AdamAtan2: betas must be in \[0, 1\)"),
    (lambda ps: AdamAtan2(ps, weight_decay=-0.1), "AdamAtan2: weight_decay must be >= 0"),
    (lambda ps: SignSGD(ps, lr=-1e-3), "SignSGD: lr must be >= 0"),
    (lambda ps: SignSGD(ps, weight_decay=-0.1), "SignSGD: weight_decay must be >= 0"),
])
def test_bad_arguments_raise_and_the_edges_of_the_valid_range_do_not(make, message):
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=message):
        make([p])
    # 0 is a valid lr, weight decay and beta (a schedule may reach lr 0; betas 0 = no averaging).
    AdamAtan2([p], lr=0.0, betas=(0.0, 0.0), weight_decay=0.0)
    AdamAtan2([p], betas=(0.999, 0.999))
    SignSGD([p], lr=0.0, weight_decay=0.0)
