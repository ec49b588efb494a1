"""torch.compile computes the same function as eager, sparse puzzle embedding included, and a
compiler failure falls back to eager with a warning instead of killing the run."""

from __future__ import annotations

import logging

import pytest
import torch

from athena.models.trm import TinyRecursiveModel
from athena.training.compile import CompiledWithFallback

pytestmark = pytest.mark.slow  # minutes of compilation and training on a CPU


def _model_and_batch():
    torch.manual_seed(0)
    model = TinyRecursiveModel(vocab_size=6, seq_len=16, num_puzzle_identifiers=3, hidden_size=32, num_heads=2,
                               H_cycles=2, L_cycles=2, halt_max_steps=3, puzzle_emb_len=2,
                               halt_exploration_prob=0.0)
    batch = {"inputs": torch.randint(1, 6, (8, 16)), "labels": torch.randint(2, 6, (8, 16)),
             "puzzle_identifiers": torch.randint(0, 3, (8,))}
    return model, batch


def _two_steps(forward, model, batch, aux_loss=None):
    carry = model.initial_carry(batch)
    losses, grads = [], []
    for _ in range(2):
        carry, out = forward(carry, batch)
        loss = out.loss if aux_loss is None else out.loss + aux_loss(model)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
                      for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    return losses, grads, carry


def test_compiled_model_matches_eager():
    model, batch = _model_and_batch()
    eager = _two_steps(model, model, batch)
    compiled = _two_steps(torch.compile(model), model, batch)
    for a, b in zip(eager[0], compiled[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for step_eager, step_compiled in zip(eager[1], compiled[1]):
        assert step_eager.keys() == step_compiled.keys() and "puzzle_embedding.weight" in step_eager
        for name in step_eager:
            torch.testing.assert_close(step_eager[name], step_compiled[name], rtol=1e-3, atol=1e-5, msg=name)
    torch.testing.assert_close(eager[2].z_H, compiled[2].z_H, rtol=1e-4, atol=1e-4)


def test_compiled_poly_adapter_model_matches_eager_router_loss_included():
    """Adapters under torch.compile: LoRA + IA3 + routed experts on every block, router loss accumulated inside
    the compiled forward; same loss and same gradients (adapter parameters only: the base is frozen)."""
    from athena.adapters import AdapterConfig, adapter_aux_loss, add_adapters

    model, batch = _model_and_batch()
    add_adapters(model, AdapterConfig(method="poly", rank=4))
    with torch.no_grad():  # non-zero deltas, so the adapters change the function
        for name, p in model.named_parameters():
            if "lora_B" in name or "expert_B" in name:
                p.normal_(0, 0.1)
    eager = _two_steps(model, model, batch, adapter_aux_loss)
    compiled = _two_steps(torch.compile(model), model, batch, adapter_aux_loss)
    for a, b in zip(eager[0], compiled[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for step_eager, step_compiled in zip(eager[1], compiled[1]):
        assert step_eager.keys() == step_compiled.keys() and any("router" in n for n in step_eager)
        assert not any(".base_layer." in n for n in step_eager)  # the frozen base gets no gradient
        for name in step_eager:
            torch.testing.assert_close(step_eager[name], step_compiled[name], rtol=1e-3, atol=1e-5, msg=name)


def test_expert_adapters_compile_into_one_graph():
    """Routed experts in training mode (router calls recorded for the loss) must not break the compiled graph:
    a break at every adapted layer would turn one fused graph into dozens of small ones."""
    from torch import nn

    from athena.adapters.poly import PolyAdapter

    torch._dynamo.reset()
    stack = nn.Sequential(*[PolyAdapter(nn.Linear(16, 16), use_ia3=True, use_moe=True, num_experts=4, top_k=2)
                            for _ in range(3)])
    explained = torch._dynamo.explain(stack)(torch.randn(2, 5, 16))
    assert explained.graph_break_count == 0, [str(b.reason)[:120] for b in explained.break_reasons]
    assert sum(len(layer.pop_router_calls()) for layer in stack) == 3  # each call recorded once


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_compiled_adapter_deltas_are_plain_adds(moe, grad):
    """Compiled, LoRA's and the experts' deltas are a GEMM plus an add, which Inductor on a GPU fuses into the next
    elementwise kernel, never an addmm: a compiled addmm runs out of place, ATen copying the whole base output
    first (see parts/lora.py add_low_rank). Eager keeps the in-place addmm_. Same values (and gradients) as eager."""
    from torch import nn
    from torch._inductor.utils import run_and_get_code

    from athena.adapters.poly import PolyAdapter

    torch.manual_seed(0)
    layer = PolyAdapter(nn.Linear(16, 24, bias=False), rank=4, use_moe=moe, num_experts=3, top_k=2)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 5, 16)
    torch._dynamo.reset()
    traced = []

    def record(gm, example_inputs):
        traced.extend(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
        return gm.forward

    with torch.set_grad_enabled(grad):
        eager = layer(x)
        torch.testing.assert_close(torch.compile(layer, backend=record)(x), eager, atol=1e-6, rtol=1e-6)
        compiled, code = run_and_get_code(torch.compile(layer), x)  # Inductor keeps them adds
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
        if grad:
            weight = layer.lora_B.weight
            expected = torch.autograd.grad(eager.square().sum(), weight)[0]
            torch.testing.assert_close(torch.autograd.grad(compiled.square().sum(), weight)[0], expected,
                                       atol=1e-4, rtol=1e-4)
    layer.pop_router_calls()
    assert "addmm" not in " ".join(traced), traced
    assert sum("built-in function add" in t for t in traced) == (2 if moe else 1), traced
    assert "extern_kernels.addmm" not in "\n".join(code)  # on a CPU Inductor would fold every flat add into one


def test_compile_failure_falls_back_to_eager(caplog):
    model, batch = _model_and_batch()
    wrapped = CompiledWithFallback(model)

    def broken(*args, **kwargs):
        raise RuntimeError("backend compiler failed: no C++ compiler found")

    wrapped.compiled = broken
    with caplog.at_level(logging.WARNING, logger="athena"):
        carry, out = wrapped(model.initial_carry(batch), batch)
    assert "torch.compile failed (backend compiler failed" in caplog.text and wrapped.failed
    reference_carry, reference = model(model.initial_carry(batch), batch)
    torch.testing.assert_close(out.loss, reference.loss)


def test_copy_out_copies_every_tensor_of_the_carry_and_keeps_gradients():
    """CUDA-graph modes copy the step's outputs out of the graph pool (the next replay overwrites it): every
    tensor of the nested carry/output must be a new storage with equal values, and the loss must stay
    differentiable."""
    from athena.training.compile import copy_out

    model, batch = _model_and_batch()
    carry, out = model(model.initial_carry(batch), batch)
    copied_carry, copied_out = copy_out((carry, out))
    pairs = [(carry.z_H, copied_carry.z_H), (carry.current_data["inputs"], copied_carry.current_data["inputs"]),
             (out.logits, copied_out.logits), (out.metrics["count"], copied_out.metrics["count"])]
    for original, copy in pairs:
        assert torch.equal(original, copy)
        assert original.untyped_storage().data_ptr() != copy.untyped_storage().data_ptr()
    assert type(copied_carry) is type(carry) and copied_carry.halted.dtype == torch.bool
    copied_out.loss.backward()
    assert model.lm_head.weight.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_mode_trains_like_eager():
    """compile_mode=reduce-overhead records CUDA graphs; the carry each step returns is the next step's input, so
    without copying it out of the graph pool the second step fails. Same losses and gradients as eager."""
    model, batch = _model_and_batch()
    model, batch = model.cuda(), {k: v.cuda() for k, v in batch.items()}
    eager = _two_steps(model, model, batch)
    graphed = _two_steps(CompiledWithFallback(model, "reduce-overhead"), model, batch)
    for a, b in zip(eager[0], graphed[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for step_eager, step_graphed in zip(eager[1], graphed[1]):
        for name in step_eager:
            torch.testing.assert_close(step_eager[name], step_graphed[name], rtol=1e-3, atol=1e-5, msg=name)
