"""AMRPA memory across TRM's recursion (arch.amrpa_window, athena/models/trm/attention_memory.py): off is today's
model, a closed gate changes nothing, window and decay as documented, the history restarts every supervision step,
gradients reach the memory, bad options are one line, and a tiny model with the memory open learns."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from athena.memory.amrpa import get_amrpa_metrics, reset_amrpa_history
from athena.models.trm import TinyRecursiveModel, TRMConfig
from helpers import ONE_THREAD_ENV, ROOT, last_line_error, make_batch, run_script, small_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

MEMORY_PARAMS = ("gate_bias", "gate_strength", "selector.0.weight", "selector.0.bias", "selector.3.weight",
                 "selector.3.bias")


def run_steps(model, batch, steps):
    carry, outs = model.initial_carry(batch), []
    for _ in range(steps):
        carry, out = model(carry, batch)
        outs.append(out)
    return carry, outs


def test_off_is_todays_model_bit_for_bit():
    off = small_model(mixer="attention")
    on = small_model(mixer="attention", amrpa_window=3)
    # No memory, no hook, the same weights and names: the option adds nothing when off.
    assert off.recursion_memory is None and all(layer.attn.memory is None for layer in off.net.layers)
    assert set(on.state_dict()) - set(off.state_dict()) == {f"recursion_memory.amrpa.{layer}.{name}"
                                                            for layer in "01" for name in MEMORY_PARAMS}
    # The memory is built last: the base weights drew the same random numbers.
    base = on.state_dict()
    assert all(torch.equal(tensor, base[name]) for name, tensor in off.state_dict().items())
    # With its hooks taken out, the model with the option is today's model (SDPA) to the last bit.
    for layer in on.net.layers:
        layer.attn.memory = None
    batch = make_batch(4, seed=0)
    for a, b in zip(run_steps(off.eval(), batch, 2)[1], run_steps(on.eval(), batch, 2)[1]):
        assert torch.equal(a.logits, b.logits) and torch.equal(a.q_halt_logits, b.q_halt_logits)


@pytest.mark.parametrize("training", [False, True])
def test_a_closed_gate_gives_the_outputs_of_the_model_without_memory(training):
    off = small_model(mixer="attention").train(training)
    on = small_model(mixer="attention", amrpa_window=4).train(training)  # gate strength starts at 0: closed
    batch = make_batch(4, seed=1)
    torch.manual_seed(5)  # training: halt exploration is 0 in small_model, so the memory's noise/dropout draws
    carry_off, outs_off = run_steps(off, batch, 3)  # (which the model without memory does not make) change nothing
    torch.manual_seed(5)
    carry_on, outs_on = run_steps(on, batch, 3)
    for a, b in zip(outs_off, outs_on):
        # Not bit-exact: the memory path computes attention eagerly (matmul, softmax, matmul) and the model without
        # it with SDPA's fused kernel; they differ in the last float32 bits (~1e-6 measured), carried through 3
        # supervision steps of 2 x 4 applications. A mixed-in memory moves logits by ~1e-1 (see the test below).
        torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b.q_halt_logits, a.q_halt_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(carry_on.z_H, carry_off.z_H, atol=1e-4, rtol=1e-4)
    metrics = get_amrpa_metrics(on)
    assert (metrics["gate_mean"] == 0).all() and (metrics["gate_impact"] == 0).all()
    # ... while an open gate changes them.
    opened = small_model(mixer="attention", amrpa_window=4, amrpa_gate_init_strength=1.0).train(training)
    torch.manual_seed(5)
    _, outs_open = run_steps(opened, batch, 3)
    assert (outs_open[-1].logits - outs_off[-1].logits).abs().max() > 1e-2
    assert (get_amrpa_metrics(opened)["gate_impact"] > 0).all()


def traced_step(model, carry, batch):
    model.recursion_memory.trace = []
    carry, out = model(carry, batch)
    trace, model.recursion_memory.trace = model.recursion_memory.trace, None
    return carry, out, trace


def test_window_and_decay_against_a_direct_computation():
    W, gamma = 2, 0.7
    model = small_model(mixer="attention", amrpa_window=W, amrpa_decay=gamma, amrpa_gate_init_strength=1.0,
                        amrpa_alpha_mlp_hidden=16, H_cycles=2, L_cycles=2).eval()
    _, _, trace = traced_step(model, model.initial_carry(make_batch(3, seed=2)), make_batch(3, seed=2))
    # Per layer, H_cycles x (L_cycles + 1) = 6 applications, layer by layer within each.
    assert [(e["layer"], e["t"]) for e in trace] == [(layer, t) for t in range(6) for layer in (0, 1)]
    with torch.no_grad():
        for entry in trace:
            layer, t, own = entry["layer"], entry["t"], entry["own"]
            if t == 0:  # nothing remembered yet: the layer's own pattern
                assert torch.equal(entry["used"], own)
                continue
            memory = model.recursion_memory.amrpa[str(layer)]
            alpha = memory.selection(entry["hidden"])  # (batch, heads, queries, W): slot W - d is d applications back
            # Only this layer's patterns, only the last W, weighted gamma**d; older ones (t > W) are not in it.
            past = {e["t"]: e["used"] for e in trace if e["layer"] == layer}
            mixed = sum((alpha[..., W - d] * gamma**d)[..., None] * past[t - d] for d in range(1, min(W, t) + 1))
            mixed = mixed / mixed.sum(-1, keepdim=True)
            similarity = (own * mixed).sum(-1) / (own.norm(dim=-1) * mixed.norm(dim=-1))
            gate = torch.sigmoid(2.0 * similarity + memory.gate_bias.view(1, -1, 1))  # gate_sensitivity 2, strength 1
            expected = own + gate[..., None] * (mixed - own)
            # Same operations in another order: float32 rounding only.
            torch.testing.assert_close(entry["used"], expected, atol=1e-6, rtol=1e-5)


def test_the_history_restarts_every_supervision_step():
    model = small_model(mixer="attention", amrpa_window=3, amrpa_gate_init_strength=1.0).eval()
    batch = make_batch(3, seed=3)
    carry, _ = model(model.initial_carry(batch), batch)
    _, first, trace = traced_step(model, carry, batch)
    # The second step starts over: its first application of each layer remembers nothing.
    assert [e["t"] for e in trace][:2] == [0, 0] and all(torch.equal(e["used"], e["own"]) for e in trace[:2])
    # From the same carry the step is the same, whatever ran before it (a history left over would change it).
    _, again = model(carry, batch)
    assert torch.equal(first.logits, again.logits)
    reset_amrpa_history(model)
    assert torch.isnan(get_amrpa_metrics(model)["gate_mean"]).all()


def test_gradients_reach_the_memory_and_its_regularisers_join_the_loss():
    batch = make_batch(4, seed=4)
    opened = small_model(mixer="attention", amrpa_window=3, amrpa_gate_init_strength=1.0).train()
    _, [out] = run_steps(opened, batch, 1)
    out.loss.backward()
    for name, p in opened.recursion_memory.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Closed gate: the task sees no memory, yet the strength learns (straight through its clamp) and the selection
    # learns from the diversity regulariser, which is in the model's loss.
    off = small_model(mixer="attention").train()
    closed = small_model(mixer="attention", amrpa_window=3).train()
    _, [out_off] = run_steps(off, batch, 1)
    _, [out_closed] = run_steps(closed, batch, 1)
    assert out_closed.loss > out_off.loss + 1e-3  # 4 samples x 0.005 x (1 - diversity); eager/SDPA differ ~1e-6
    out_closed.loss.backward()
    for memory in closed.recursion_memory.amrpa.values():
        assert memory.gate_strength.grad.abs().sum() > 0 and memory.selector[0].weight.grad.abs().sum() > 0
        assert memory.pending_losses == []  # taken by the model's loss: a callback adds nothing twice


@pytest.mark.parametrize("kwargs,expected", [
    ({"mixer": "mlp", "amrpa_window": 2}, "amrpa_window=2 needs mixer=attention (mixer=mlp has no attention pattern"),
    ({"amrpa_window": 2, "gradient_checkpointing": True}, "amrpa_window does not work with gradient_checkpointing"),
    ({"amrpa_window": -1}, "amrpa_window: Input should be greater than or equal to 0"),
    ({"amrpa_decay": 1.5}, "amrpa_decay: Input should be less than or equal to 1"),
    ({"amrpa_gate_init_strength": 2}, "amrpa_gate_init_strength: Input should be less than or equal to 1"),
])
def test_bad_options_fail_in_one_line(kwargs, expected):
    with pytest.raises(ValueError) as error:
        TinyRecursiveModel(6, 16, 1, hidden_size=32, num_heads=2, **kwargs)
    message = str(error.value)
    assert "\n" not in message and expected in message, message
    with pytest.raises(ValueError):
        TRMConfig(**kwargs)


@pytest.mark.slow  # one pretrain.py subprocess
def test_bad_options_fail_in_one_line_through_pretrain(tmp_path, data_root):
    proc = run_script("pretrain.py", "experiment=smoke", "arch.mixer=mlp", "arch.amrpa_window=4",
                      f"hydra.run.dir={tmp_path / 'run'}", data_root=data_root, check=False, full_errors=False)
    last = last_line_error(proc)
    assert last.startswith("error: invalid config: arch: amrpa_window=4 needs mixer=attention"), last
    assert not (tmp_path / "run").exists()


def test_a_tiny_model_with_the_memory_open_learns():
    """Reverse a sequence (attention must move information across positions) with the memory mixing in from the
    first step: the loss falls and the gate stays in use."""
    torch.manual_seed(0)
    model = TinyRecursiveModel(6, 8, 1, hidden_size=32, num_heads=2, expansion=2.0, num_layers=1, H_cycles=1,
                               L_cycles=2, halt_max_steps=1, puzzle_emb_len=0, mixer="attention", amrpa_window=2,
                               amrpa_gate_init_strength=1.0, amrpa_alpha_mlp_hidden=16, loss_type="softmax")
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    losses, accuracies = [], []
    for _ in range(250):
        inputs = torch.randint(1, 6, (32, 8), generator=g)
        batch = {"inputs": inputs, "labels": inputs.flip(1), "puzzle_identifiers": torch.zeros(32, dtype=torch.long)}
        _, out = model(model.initial_carry(batch), batch)  # halt_max_steps=1: every step is a fresh puzzle
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out.metrics["lm_loss"]) / 32)
        accuracies.append(float(out.metrics["accuracy"]) / 32)
    start, end = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert end < 0.4 * start, (start, end)  # measured 1.71 -> 0.43
    assert sum(accuracies[-10:]) / 10 > 0.6  # chance is 1/5; measured 0.84
    assert get_amrpa_metrics(model)["gate_impact"].min() > 1e-3


@pytest.mark.slow  # the study script in a subprocess, through the real loop
def test_study_script_runs_at_toy_size(tmp_path, data_root):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "amrpa_trm.py"), "--toy", "--data-root",
                           str(data_root), "--out", str(tmp_path), "--steps", "4"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **ONE_THREAD_ENV, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "amrpa_trm.json").read_text())
    plain, memory = result["runs"]
    assert (plain["arm"], memory["arm"]) == ("attention", "attention + amrpa W=4")
    assert plain["steps"] == memory["steps"] == 4 and plain["test_count"] == memory["test_count"] > 0
    assert memory["parameters"] > plain["parameters"] and plain["amrpa"] == {}
    # The memory's metrics were logged by the loop (memory callback) from the model's last training step.
    assert set(memory["amrpa"]) == {"gate_mean", "gate_impact", "alpha_diversity", "memory_similarity",
                                    "gate_strength"}
    for run in (plain, memory):
        assert 0 <= run["token_accuracy"] <= 1 and run["step_ms"] > 0 and run["peak_mem_mb"] > 0
    assert "| attention + amrpa W=4 |" in (tmp_path / "amrpa_trm.md").read_text()
    assert set(result["interleaved_step_ms"]) == {"attention", "amrpa W=4 (selection MLP 64)",
                                                  "amrpa W=4 (selection MLP 384, default)"}
    assert all(ms > 0 for ms in result["interleaved_step_ms"].values())
