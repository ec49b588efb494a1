"""Progressive freezing (athena.training.freezing): a converged layer freezes after its window and a loss spike thaws
it; only a prefix from the input side freezes; frozen parameters stop changing and their Adam state stays as it
was; autograd does no work for a frozen prefix (no graph, no saved activations, no gradients); bad knobs are one
line. The resumed run is in tests/training/test_continual_runs.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from athena.config import ConfigError, validate_config
from athena.models.hf import causal_lm
from athena.training.freezing import ProgressiveFreezingScheduler
from helpers import composed

VOCAB, SEQ = 50, 12


class ToyStack(nn.Module):
    """The interface the scheduler reads (an `embed_tokens` and `fsdp_units()`, as TRM has) around three blocks;
    `dead` blocks (and the embedding, when listed) get their gradients zeroed by the test loop."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(VOCAB, 16)
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.head = nn.Linear(16, VOCAB)

    def fsdp_units(self):
        return list(self.blocks)

    def forward(self, tokens):
        h = self.embed_tokens(tokens)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h)


def toy_loss(model, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (4, SEQ), generator=g)
    return nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(1, dims=1).flatten())


def train(model, scheduler, steps: int, dead: list[str], start: int = 0, loss_scale: dict[int, float] | None = None):
    """A plain loop: SGD (a zero gradient moves nothing), the dead modules' gradients zeroed, scheduler.step(loss)
    after the optimizer step and before zero_grad. Returns the events."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    events = []
    for i in range(start, start + steps):
        loss = toy_loss(model, i)
        loss.backward()
        for name in dead:
            for p in model.get_submodule(name).parameters():
                if p.grad is not None:
                    p.grad.zero_()
        optimizer.step()
        events += scheduler.step(loss.item() * (loss_scale or {}).get(i, 1.0))
        optimizer.zero_grad()
    return events


def test_a_layer_with_zero_gradient_freezes_after_the_window_and_a_loss_spike_thaws_it(one_thread):
    model = ToyStack()
    scheduler = ProgressiveFreezingScheduler(model=model, threshold=1e-5, window_size=10)
    assert scheduler.layer_names == ["embed_tokens", "blocks.0", "blocks.1"]
    events = train(model, scheduler, 9, dead=["embed_tokens"])
    assert events == [] and scheduler.num_frozen == 0  # 9 checks under: one short of the window
    events = train(model, scheduler, 1, dead=["embed_tokens"], start=9)
    assert [(e.step, e.layer, e.action) for e in events] == [(10, "embed_tokens", "freeze")]
    assert "for 10 checks" in events[0].reason
    assert not model.embed_tokens.weight.requires_grad and model.blocks[0].weight.requires_grad  # blocks learn
    # A loss 3x its moving average (the factor is 2) thaws the frozen layer.
    events = train(model, scheduler, 2, dead=["embed_tokens"], start=10, loss_scale={11: 3.0})
    assert [(e.step, e.layer, e.action) for e in events] == [(12, "embed_tokens", "unfreeze")]
    assert "> 2 x its moving average" in events[0].reason and model.embed_tokens.weight.requires_grad
    # Its window starts again after the spike: still dead, it freezes again 10 checks later, not at once.
    events = train(model, scheduler, 10, dead=["embed_tokens"], start=12)
    assert [(e.step, e.action) for e in events] == [(22, "freeze")]


def test_only_a_prefix_from_the_input_side_freezes(one_thread):
    model = ToyStack()
    # ema_beta 0: the "moving average" is the last value, so a layer that stops learning is under at once.
    scheduler = ProgressiveFreezingScheduler(model=model, threshold=1e-5, window_size=3, ema_beta=0.0)
    # blocks.1 is dead, the embedding before it is not: blocks.1 waits, however long its window has been full.
    assert train(model, scheduler, 8, dead=["blocks.1"]) == [] and scheduler.num_frozen == 0
    assert scheduler.layers[2].stats.checks_under >= 3
    # Once the embedding and blocks.0 converge too, the three freeze in order, input side first.
    events = train(model, scheduler, 4, dead=["embed_tokens", "blocks.0", "blocks.1"], start=8)
    assert [(e.step, e.layer) for e in events] == [(11, "embed_tokens"), (11, "blocks.0"), (11, "blocks.1")]


def tiny_llama(tied: bool) -> nn.Module:
    torch.manual_seed(0)
    return causal_lm(VOCAB, SEQ, 1, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
                     tie_embeddings=tied)


def lm_loss(model, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (4, SEQ), generator=g)
    logits = model(input_ids=tokens).logits
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def freeze_two(model) -> ProgressiveFreezingScheduler:
    """Freeze the first two layers: thresholds every layer meets, window 1, at most two frozen."""
    scheduler = ProgressiveFreezingScheduler(model=model, threshold=1e9, window_size=1, max_frozen=2,
                                             spike_factor=None)
    lm_loss(model, 0).backward()
    scheduler.step()  # the first check has no relative change yet
    model.zero_grad()
    lm_loss(model, 1).backward()
    scheduler.step()
    model.zero_grad()
    return scheduler


def test_frozen_parameters_stop_changing_and_their_adam_state_stays(one_thread):
    model = tiny_llama(tied=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = ProgressiveFreezingScheduler(model=model, threshold=1e9, window_size=3, max_frozen=2,
                                             spike_factor=None)
    for step in range(6):  # Adam moments exist for every parameter before anything freezes
        lm_loss(model, step).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    assert scheduler.frozen_layers == ["model.embed_tokens", "model.layers.0"]
    frozen = [p for layer in scheduler.layers[:2] for p in layer.params]
    training = scheduler.layers[2].params
    before = {id(p): p.detach().clone() for p in frozen + training}
    state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in frozen}
    for step in range(6, 10):
        lm_loss(model, step).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    for p in frozen:
        assert p.grad is None and torch.equal(p, before[id(p)])  # not even weight decay moved it
        for key, value in optimizer.state[p].items():  # exp_avg, exp_avg_sq, step: as they were
            assert torch.equal(value, state[id(p)][key]), key
    assert all(not torch.equal(p, before[id(p)]) for p in training)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_backward_does_no_work_for_a_frozen_prefix(tied, one_thread):
    model = tiny_llama(tied)
    scheduler = freeze_two(model)
    layers = model.model.layers
    if tied:  # the embedding trains as the head; only its input role froze, with the first decoder layer
        assert scheduler.layer_names == ["model.layers.0", "model.layers.1", "model.layers.2"]
        assert scheduler.frozen_layers == ["model.layers.0", "model.layers.1"]
        first_trained = layers[2]
    else:
        assert scheduler.frozen_layers == ["model.embed_tokens", "model.layers.0"]
        first_trained = layers[1]
    frozen_modules = [m for m in layers if m is not first_trained and not any(p.requires_grad for p in m.parameters())]
    # Which module's forward saved each tensor autograd keeps for backward, and whether its output is in the graph.
    running: list[nn.Module] = []
    saved: dict[nn.Module, int] = {m: 0 for m in layers}
    graph: dict[nn.Module, bool] = {}

    def enter(module, args):
        running.append(module)

    def leave(module, args, out):
        running.pop()
        graph[module] = _hidden(out).grad_fn is not None

    hooks = [h for m in layers for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]

    def pack(t):
        if running:
            saved[running[-1]] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(model, 2)
    loss.backward()
    for h in hooks:
        h.remove()
    assert frozen_modules and all(saved[m] == 0 and not graph[m] for m in frozen_modules)  # no activations, no graph
    assert saved[first_trained] > 0 and graph[first_trained]  # the first trained layer does keep its activations
    for m in frozen_modules:
        assert all(p.grad is None for p in m.parameters())
    embedding = model.get_input_embeddings().weight
    assert (embedding.grad is not None) == tied  # tied: it still learns as the output head


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def test_a_resumed_scheduler_freezes_the_same_layers_and_continues_the_same(one_thread):
    model = ToyStack()
    scheduler = ProgressiveFreezingScheduler(model=model, threshold=1e-5, window_size=3, ema_beta=0.0)
    train(model, scheduler, 5, dead=["embed_tokens"])
    state = scheduler.state_dict()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected = train(model, scheduler, 6, dead=["embed_tokens", "blocks.0"], start=5)

    resumed_model = ToyStack()
    resumed_model.load_state_dict(weights)
    resumed = ProgressiveFreezingScheduler(model=resumed_model, threshold=1e-5, window_size=3, ema_beta=0.0)
    resumed.load_state_dict(state)
    assert resumed.frozen_layers == ["embed_tokens"] and not resumed_model.embed_tokens.weight.requires_grad
    got = train(resumed_model, resumed, 6, dead=["embed_tokens", "blocks.0"], start=5)
    assert [(e.step, e.layer, e.action) for e in got] == [(e.step, e.layer, e.action) for e in expected]
    assert [(e.step, e.layer) for e in expected] == [(8, "blocks.0")]


def test_adaptive_thresholds_follow_each_layers_own_scale(one_thread):
    model = ToyStack()
    scheduler = ProgressiveFreezingScheduler(model=model, adaptive_threshold=True, adaptive_ratio=0.5,
                                             window_size=3)
    train(model, scheduler, 3, dead=[])
    reference = scheduler.layers[0].stats.reference
    assert reference is not None and scheduler.thresholds(scheduler.layers[0]) == (0.5 * reference[0],
                                                                                   0.5 * reference[1])
    # A dead embedding's averages fall below half their early values within a few checks; it freezes.
    events = train(model, scheduler, 40, dead=["embed_tokens"], start=3)
    assert events and events[0].layer == "embed_tokens" and events[0].action == "freeze"


def test_bad_knobs_are_one_line():
    with pytest.raises(ConfigError, match=r"^invalid config: freezing\.window_size: Input should be greater than or "
                                          r"equal to 1 \(got 0\)$"):
        validate_config(composed("freezing=progressive", "freezing.window_size=0"))
    with pytest.raises(ConfigError, match=r"^invalid config: freezing\.unfreeze: Input should be 'last' or 'all'"):
        validate_config(composed("freezing=progressive", "freezing.unfreeze=first"))
    with pytest.raises(ConfigError, match=r"^ProgressiveFreezingScheduler: threshold: Input should be greater than 0"):
        ProgressiveFreezingScheduler(model=ToyStack(), threshold=-1)
    with pytest.raises(ConfigError, match=r"^ProgressiveFreezingScheduler: windows: unknown key"):
        ProgressiveFreezingScheduler(model=ToyStack(), windows=3)
