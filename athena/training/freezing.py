"""Progressive freezing: stop training the layers nearest the input once they have converged; thaw on a loss spike.

    freezing = ProgressiveFreezingScheduler(model=model, threshold=1e-5, window_size=10)
    for batch in data:
        loss = ...; loss.backward(); optimizer.step()
        freezing.step(loss)            # after the optimizer step, before zero_grad: it reads the gradients
        optimizer.zero_grad()

or in a run: `python pretrain.py ... freezing=progressive` (ProgressiveFreezingCallback, knobs in
conf/freezing/progressive.yaml, schema athena.training.freezing_config).

Layers, input side first: the input embedding, then the model's blocks (athena.models.build.fsdp_units: TRM's
reasoning blocks, a Hugging Face model's decoder layers); only parameters that train at the start count, and a
layer with none is left out. Per layer and check: the L2 norm of its gradient and its relative parameter change
||W_now - W_before|| / ||W_before|| per step, each as a moving average. A layer freezes when both averages stayed
under their thresholds for `window_size` consecutive checks AND every layer before it is frozen: the frozen layers
are always a prefix, so their outputs need no gradient and autograd builds no graph through them (no activations
saved, no gradients computed: the backward really gets shorter). An input embedding tied to the output head keeps
training as the head; its input role freezes with the first block (its output is detached). In a recursive model
(TRM reuses its blocks in every cycle) a frozen block saves only its weight gradients: later cycles still
backpropagate through it.

A loss above `spike_factor` x its moving average thaws the frozen layer nearest the output (`unfreeze: all`: the
whole prefix), and every layer's window starts again. With `adaptive_threshold`, a layer's thresholds are
`adaptive_ratio` x its own averages after its first `window_size` checks (scale-free, unlike absolute gradient
norms), and each spike multiplies them by `adaptive_decay`, so a thawed layer must settle further before freezing
again. Everything that decides (statistics, windows, frozen set, events) is in state_dict: a resumed run freezes
the same layers at the same steps.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from pydantic import ValidationError
from torch import nn

from athena.errors import AthenaError, ConfigError
from athena.models.build import fsdp_units
from athena.schema import describe
from athena.training import distributed
from athena.training.callback_base import Callback
from athena.training.freezing_config import FreezingKnobs

if TYPE_CHECKING:
    from athena.config import RunConfig

log = logging.getLogger("athena")


@dataclass
class FreezeEvent:
    step: int
    layer: str
    action: str  # "freeze" | "unfreeze"
    reason: str


@dataclass
class LayerStats:
    """What the scheduler knows of one layer: its moving averages and how long they have stayed under."""

    grad_norm: float | None = None  # moving average of the gradient norm
    change: float | None = None  # moving average of the relative parameter change per step
    checks_under: int = 0  # consecutive checks with both averages under their thresholds
    observed: int = 0  # checks that measured this layer (frozen layers are not measured)
    reference: tuple[float, float] | None = None  # adaptive: (grad_norm, change) after its first window
    frozen: bool = False


@dataclass
class FreezableLayer:
    name: str
    params: list[nn.Parameter]  # the parameters that stop training when it freezes
    detach: nn.Module | None = None  # a tied input embedding whose output is cut from the graph when it freezes
    stats: LayerStats = field(default_factory=LayerStats)


def input_embedding(model: nn.Module) -> nn.Module | None:
    """A Hugging Face model's input embedding, or a module's own `embed_tokens` (TRM)."""
    if hasattr(model, "get_input_embeddings"):
        try:
            return model.get_input_embeddings()
        except NotImplementedError:
            pass
    return getattr(model, "embed_tokens", None)


def freezable_layers(model: nn.Module, include_embeddings: bool = True) -> list[FreezableLayer]:
    """The model's layers from the input side, each with the parameters of it that train now (see module doc)."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    owners: dict[int, int] = {}  # parameter id -> how many modules' parameters() list it (tied weights: 2)
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1

    def trainable(module: nn.Module) -> list[nn.Parameter]:
        return [p for p in module.parameters() if p.requires_grad]

    layers: list[FreezableLayer] = []
    embedding = input_embedding(model) if include_embeddings else None
    tied = None
    if embedding is not None and trainable(embedding):
        if any(owners[id(p)] > 1 for p in trainable(embedding)):
            tied = embedding  # shared with the output head: only its input role can freeze, with the first block
        else:
            layers.append(FreezableLayer(_module_name(model, embedding, names), trainable(embedding)))
    for unit in fsdp_units(model):
        params = trainable(unit)
        if params:
            name = _module_name(model, unit, names)
            layers.append(FreezableLayer(name, params, detach=tied))
            tied = None
    if not layers:
        raise AthenaError(f"progressive freezing: {type(model).__name__} has no layers with trainable parameters to "
                          "freeze (it needs an input embedding or blocks: fsdp_units / decoder layers)")
    return layers


def _module_name(model: nn.Module, module: nn.Module, names: dict[int, str]) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name or type(module).__name__
    return names.get(id(next(module.parameters())), type(module).__name__)


def knobs_from(knobs: dict[str, Any]) -> FreezingKnobs:
    try:
        return FreezingKnobs(**knobs)
    except ValidationError as error:
        raise ConfigError(f"ProgressiveFreezingScheduler: {describe(error)}") from None


class ProgressiveFreezingScheduler:
    """See the module docstring. `set_trainable(params, flag)` changes which parameters train (a run passes its
    trainer's, so optimisers, EMA and gradient sync follow); by default it sets requires_grad."""

    def __init__(self, model: nn.Module, *, set_trainable: Callable[[list[nn.Parameter], bool], None] | None = None,
                 **knobs: Any):
        self.knobs = knobs_from(knobs)
        self.model = model
        self.set_trainable = set_trainable or _requires_grad
        self.layers = freezable_layers(model, self.knobs.include_embeddings)
        self.trained_numel = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
        self.steps = 0  # optimizer steps seen
        self.loss_average: float | None = None
        self.loss_observed = 0
        self.threshold_scale = 1.0  # adaptive: adaptive_decay ** spikes
        self.events: list[FreezeEvent] = []
        self._grad_norms: torch.Tensor | None = None  # recorded this step, before the gradients are freed
        self._snapshot: dict[int, list[torch.Tensor]] = {}  # layer index -> its parameters at the last check
        self._snapshot_step = 0
        self._hooks = [layer.detach.register_forward_hook(self._detach_hook(layer)) for layer in self.layers
                       if layer.detach is not None]
        self._take_snapshot()

    # ------------------------------------------------------------------------------------------------ the public view
    @property
    def num_frozen(self) -> int:
        return sum(layer.stats.frozen for layer in self.layers)

    @property
    def frozen_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.stats.frozen]

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def trainable_fraction(self) -> float:
        """Share of the parameters (elements) that trained at the start and still train."""
        frozen = sum(p.numel() for layer in self.layers if layer.stats.frozen for p in layer.params)
        return 1.0 - frozen / max(self.trained_numel, 1)

    def is_check_step(self, step: int | None = None) -> bool:
        """Whether optimizer step `step` (default: the next one) is a check."""
        step = self.steps + 1 if step is None else step
        return step % self.knobs.check_every == 0

    # ------------------------------------------------------------------------------------------------ each step
    def record_gradients(self) -> None:
        """Read the gradient norms now (a run calls it after backward, before the optimizer frees the gradients);
        step() reads them itself when the gradients are still there."""
        self._grad_norms = self._layer_grad_norms()

    def step(self, loss: float | torch.Tensor | None = None) -> list[FreezeEvent]:
        """One optimizer step done (its gradients still in .grad, or recorded): update, freeze, thaw. `loss` is the
        step's training loss (for the spike check). Returns the events of this step."""
        self.steps += 1
        if not self.is_check_step(self.steps):
            self._grad_norms = None
            return []
        grad_norms = self._grad_norms if self._grad_norms is not None else self._layer_grad_norms()
        self._grad_norms = None
        changes = self._layer_changes()
        # One read back from the device per check: the norms, changes and loss together.
        values = torch.cat([grad_norms.double().cpu(), changes.double().cpu(),
                            torch.as_tensor([math.nan if loss is None else float(loss)], dtype=torch.float64)])
        n = len(self.layers)
        grad_list, change_list, loss_value = values[:n].tolist(), values[n:2 * n].tolist(), values[-1].item()
        events = self._decide(grad_list, change_list, None if math.isnan(loss_value) else loss_value)
        self._take_snapshot()
        return events

    def _decide(self, grad_norms: list[float], changes: list[float], loss: float | None) -> list[FreezeEvent]:
        k, events = self.knobs, []
        measured = [not layer.stats.frozen for layer in self.layers]  # trained this step: it has statistics
        spiked = self._loss_spike(loss)
        if spiked is not None:
            events += self._thaw(spiked)
        for layer, grad_norm, change, trained in zip(self.layers, grad_norms, changes, measured):
            if not trained:
                continue
            s = layer.stats
            s.grad_norm = grad_norm if s.grad_norm is None else k.ema_beta * s.grad_norm + (1 - k.ema_beta) * grad_norm
            if not math.isnan(change):
                s.change = change if s.change is None else k.ema_beta * s.change + (1 - k.ema_beta) * change
            s.observed += 1
            if k.adaptive_threshold and s.reference is None and s.observed >= k.window_size and s.change is not None:
                s.reference = (s.grad_norm, s.change)
            grad_limit, change_limit = self.thresholds(layer)
            under = s.change is not None and s.grad_norm < grad_limit and s.change < change_limit
            s.checks_under = s.checks_under + 1 if under and spiked is None else 0
        if spiked is None and self.steps >= k.warmup_steps:
            events += self._freeze_ready_prefix()
        for event in events:
            self.events.append(event)
            log.info("freezing: step %d: %s %s (%s)", event.step, event.action, event.layer, event.reason)
        return events

    def thresholds(self, layer: FreezableLayer) -> tuple[float, float]:
        """(gradient norm, relative change) a layer's averages must stay under. Adaptive mode gives 0 until the
        layer's reference exists: nothing freezes before it has been watched for a window."""
        k = self.knobs
        if k.adaptive_threshold:
            if layer.stats.reference is None:
                return 0.0, 0.0
            scale = k.adaptive_ratio * self.threshold_scale
            return scale * layer.stats.reference[0], scale * layer.stats.reference[1]
        return k.threshold, k.change_threshold if k.change_threshold is not None else k.threshold

    def _loss_spike(self, loss: float | None) -> str | None:
        """The reason for thawing when `loss` spikes over its moving average (which it then joins), else None."""
        k = self.knobs
        if loss is None or not math.isfinite(loss):
            return None
        reason = None
        average = self.loss_average
        if (k.spike_factor is not None and average is not None and self.loss_observed >= k.window_size
                and loss > k.spike_factor * average and self.num_frozen):
            reason = f"loss {loss:.4g} > {k.spike_factor:g} x its moving average {average:.4g}"
        self.loss_average = loss if average is None else k.ema_beta * average + (1 - k.ema_beta) * loss
        self.loss_observed += 1
        return reason

    def _freeze_ready_prefix(self) -> list[FreezeEvent]:
        k, events = self.knobs, []
        for index, layer in enumerate(self.layers):
            if layer.stats.frozen:
                continue
            if k.max_frozen is not None and self.num_frozen >= k.max_frozen:
                break
            if layer.stats.checks_under < k.window_size:
                break  # prefix only: a later layer waits for this one
            grad_limit, change_limit = self.thresholds(layer)
            reason = (f"gradient norm {layer.stats.grad_norm:.3g} < {grad_limit:.3g} and relative change "
                      f"{layer.stats.change:.3g} < {change_limit:.3g} for {layer.stats.checks_under} checks")
            self._set_frozen(index, True)
            events.append(FreezeEvent(self.steps, layer.name, "freeze", reason))
        return events

    def _thaw(self, reason: str) -> list[FreezeEvent]:
        frozen = [i for i, layer in enumerate(self.layers) if layer.stats.frozen]
        chosen = frozen if self.knobs.unfreeze == "all" else frozen[-1:]
        events = []
        for index in reversed(chosen):
            self._set_frozen(index, False)
            events.append(FreezeEvent(self.steps, self.layers[index].name, "unfreeze", reason))
        if self.knobs.adaptive_threshold:
            self.threshold_scale *= self.knobs.adaptive_decay
        for layer in self.layers:
            layer.stats.checks_under = 0
        return events

    def _set_frozen(self, index: int, frozen: bool) -> None:
        layer = self.layers[index]
        layer.stats.frozen = frozen
        if frozen:
            for p in layer.params:
                p.grad = None  # a plain loop's optimizer.step() before zero_grad must not use it
            self._snapshot.pop(index, None)
        else:
            layer.stats.checks_under = 0
        self.set_trainable(layer.params, not frozen)

    def _detach_hook(self, layer: FreezableLayer):
        def hook(module, inputs, output):
            return output.detach() if layer.stats.frozen else output
        return hook

    # ------------------------------------------------------------------------------------------------ statistics
    def _layer_grad_norms(self) -> torch.Tensor:
        """(layers,) L2 norm of each layer's gradient (0 for a frozen layer or one without gradients)."""
        device = self.layers[0].params[0].device
        out = []
        for layer in self.layers:
            grads = [p.grad for p in layer.params if p.grad is not None] if not layer.stats.frozen else []
            if grads:
                norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads])
                out.append(torch.linalg.vector_norm(torch.stack(norms)).to(device))
            else:
                out.append(torch.zeros((), device=device))
        return torch.stack(out)

    def _layer_changes(self) -> torch.Tensor:
        """(layers,) relative change per step since the last check; nan where unknown (frozen, or just thawed)."""
        device = self.layers[0].params[0].device
        steps = max(self.steps - self._snapshot_step, 1)
        out = []
        for index, layer in enumerate(self.layers):
            before = self._snapshot.get(index)
            if before is None or layer.stats.frozen:
                out.append(torch.full((), math.nan, device=device))
                continue
            now = [p.detach().float() for p in layer.params]
            diff = torch._foreach_sub(now, before)
            change = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(diff)))
            size = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(before))).clamp_min(1e-12)
            out.append((change / size / steps).to(device))
        return torch.stack(out)

    def _take_snapshot(self) -> None:
        self._snapshot = {i: [p.detach().float().clone() for p in layer.params]
                          for i, layer in enumerate(self.layers) if not layer.stats.frozen}
        self._snapshot_step = self.steps

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"layers": self.layer_names, "stats": [asdict(layer.stats) for layer in self.layers],
                "steps": self.steps, "loss_average": self.loss_average, "loss_observed": self.loss_observed,
                "threshold_scale": self.threshold_scale, "events": json.dumps([asdict(e) for e in self.events])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the statistics and freeze exactly the layers that were frozen (the parameters' current values
        are the reference for the next relative change: load the model first)."""
        if not state:
            return
        if list(state["layers"]) != self.layer_names:
            raise AthenaError(f"progressive freezing state is for layers {list(state['layers'])[:3]}..., this model "
                              f"has {self.layer_names[:3]}...: resume with the same model and adapter")
        for index, (layer, saved) in enumerate(zip(self.layers, state["stats"])):
            frozen = bool(saved["frozen"])
            reference = saved.get("reference")
            layer.stats = LayerStats(**{**saved, "frozen": layer.stats.frozen,
                                        "reference": tuple(reference) if reference is not None else None})
            if frozen != layer.stats.frozen:
                self._set_frozen(index, frozen)
            layer.stats.checks_under = saved["checks_under"]
        self.steps, self.loss_average = state["steps"], state["loss_average"]
        self.loss_observed, self.threshold_scale = state["loss_observed"], state["threshold_scale"]
        self.events = [FreezeEvent(**e) for e in json.loads(state["events"])]
        self._take_snapshot()

    def remove(self) -> None:
        """Thaw every layer and remove the detach hooks (the model as it was given)."""
        for index, layer in enumerate(self.layers):
            if layer.stats.frozen:
                self._set_frozen(index, False)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def _requires_grad(params: list[nn.Parameter], trainable: bool) -> None:
    for p in params:
        p.requires_grad_(trainable)


class ProgressiveFreezingCallback(Callback):
    """freezing=progressive in a run: the scheduler above, driven by the loop. Gradients are read after they are
    summed over processes (every rank decides the same); the loss is summed over processes too. Logs
    freeze/layers_frozen, freeze/trainable_fraction and freeze/events; writes <run dir>/eval/freezing.json."""

    name = "freezing"

    def __init__(self, **knobs: Any):
        self.knobs = knobs_from(knobs)  # checked now: a bad knob stops before the model is built
        self.scheduler: ProgressiveFreezingScheduler | None = None

    def on_setup(self, trainer) -> None:
        self.scheduler = ProgressiveFreezingScheduler(trainer.model, set_trainable=trainer.set_trainable,
                                                      **self.knobs.model_dump())
        layers = self.scheduler.layers
        tied = f" (the tied input embedding's input role freezes with {layers[0].name})" if layers[0].detach else ""
        log.info("progressive freezing over %d layers, input side first: %s%s", len(layers),
                 ", ".join(self.scheduler.layer_names), tied)

    def on_after_backward(self, trainer, step):
        if self.scheduler.is_check_step(step):
            self.scheduler.record_gradients()

    def on_step_end(self, trainer, step):
        loss = None
        if self.scheduler.is_check_step(step):
            loss = step_loss(trainer.step_sums)
        self.scheduler.step(loss)

    def on_log(self, step, metrics):
        s = self.scheduler
        return {"freeze/layers_frozen": float(s.num_frozen), "freeze/trainable_fraction": s.trainable_fraction(),
                "freeze/events": float(len(s.events))}

    def on_finish(self, trainer):
        if not trainer.is_main:
            return
        s = self.scheduler
        out = trainer.run_dir / "eval" / "freezing.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"layers": s.layer_names, "frozen_at_end": s.frozen_layers,
                                   "events": [asdict(e) for e in s.events]}, indent=2))

    def state_dict(self):
        return self.scheduler.state_dict() if self.scheduler else {}

    def load_state_dict(self, state):
        self.scheduler.load_state_dict(state)


def step_loss(sums: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The step's loss from the task's sums, summed over processes: per labelled token where the task counts them
    (a causal LM's batches hold different numbers of answer tokens), else the task's own loss sum."""
    if "loss" not in sums:
        return None
    loss = torch.as_tensor(sums["loss"], dtype=torch.float64)
    tokens = torch.as_tensor(sums.get("tokens", 1.0), dtype=torch.float64, device=loss.device)
    pair = distributed.all_reduce_sum(torch.stack([loss, tokens]))
    return pair[0] / pair[1].clamp_min(1.0)


def freezing_callback(cfg: RunConfig) -> Callback | None:
    """freezing=progressive: the callback with the config's knobs; none: no callback."""
    if cfg.freezing.name == "none":
        return None
    if cfg.train.parallel == "fsdp" and distributed.env_info().enabled:
        raise ConfigError("freezing=progressive is not supported with train.parallel=fsdp yet (FSDP2 groups "
                          "parameters for its reduce-scatter once); use train.parallel=ddp")
    return ProgressiveFreezingCallback(**cfg.freezing.knobs())
