"""Optimizers used by TRM: AdamAtan2 for the dense weights, SignSGD for the sparse puzzle embedding.

Pure PyTorch, CPU and GPU. `lr` may be a float or a 0-d tensor (so a scheduler can update it in place).
"""

import torch
from torch.optim import Optimizer


class AdamAtan2(Optimizer):
    """Adam whose update is atan2(m_hat, sqrt(v_hat)) instead of m_hat / (sqrt(v_hat) + eps).

    atan2 is scale-invariant like Adam's ratio but bounded in (-pi/2, pi/2] and defined at v = 0, so no epsilon
    is needed ("Scaling Exponents Across Parameterizations and Optimizers", Everett et al. 2024). Per step:
        p *= 1 - lr * wd                      (decoupled weight decay)
        m  = lerp(m, g, 1 - b1);  v = b2 * v + (1 - b2) * g^2
        p -= lr * atan2(m / (1 - b1^t), sqrt(v / (1 - b2^t)))
    foreach=None picks the batched torch._foreach_* path when available, else a per-tensor loop.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach: bool | None = None):
        if not 0.0 <= float(lr):
            raise ValueError(f"AdamAtan2: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamAtan2: betas must be in [0, 1), got {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"AdamAtan2: weight_decay must be >= 0, got {weight_decay}")
        if foreach is None:
            foreach = hasattr(torch, "_foreach_lerp_") and hasattr(torch, "_foreach_addcmul_")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, foreach=foreach))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamAtan2 got a sparse gradient; train the puzzle embedding with SignSGD")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1  # a python int: bias corrections stay host scalars, no device sync
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if params:
                update = _adam_atan2_foreach if group["foreach"] else _adam_atan2_loop
                update(params, grads, exp_avgs, exp_avg_sqs, steps, group["lr"], *group["betas"], group["weight_decay"])
        return loss


def _adam_atan2_loop(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, weight_decay):
    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        m_hat = m / (1 - beta1**t)
        v_hat_sqrt = (v / (1 - beta2**t)).sqrt_()
        p.sub_(torch.atan2(m_hat, v_hat_sqrt).mul_(lr))


def _adam_atan2_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, weight_decay):
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    m_hats = torch._foreach_div(exp_avgs, [1 - beta1**t for t in steps])
    v_hat_sqrts = torch._foreach_div(exp_avg_sqs, [1 - beta2**t for t in steps])
    torch._foreach_sqrt_(v_hat_sqrts)
    # There is no _foreach_atan2: one kernel per tensor here, everything else is batched.
    updates = [torch.atan2(m, s) for m, s in zip(m_hats, v_hat_sqrts)]
    torch._foreach_mul_(updates, lr)
    torch._foreach_sub_(params, updates)


class SignSGD(Optimizer):
    """SignSGD with decoupled weight decay, for the sparse puzzle embedding.

    With a sparse COO gradient only the rows present in the batch change (duplicates are summed first):
        p[rows] = p[rows] * (1 - lr * wd) - lr * sign(grad[rows])
    A dense gradient updates every row. With very sparse gradients Adam's update is close to sign(g) anyway,
    and SignSGD keeps no per-row state for a table that can have millions of rows.
    """

    def __init__(self, params, lr=1e-2, weight_decay=0.1):
        if not 0.0 <= float(lr):
            raise ValueError(f"SignSGD: lr must be >= 0, got {lr}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"SignSGD: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    grad = p.grad.coalesce()  # sums gradients of ids repeated in the batch
                    rows = grad.indices()[0]  # (n_rows,)
                    new_rows = p[rows] * (1 - lr * wd) - lr * torch.sign(grad.values())  # (n_rows, dim)
                    p.index_copy_(0, rows, new_rows.to(p.dtype))
                else:
                    p.mul_(1 - lr * wd).sub_(torch.sign(p.grad) * lr)
        return loss
