"""The pretraining recipe: explicit setup steps, one training loop, evaluation, checkpoints.

    recipe = PretrainRecipe(run_config, run_dir)
    recipe.setup()      # lock folder -> data -> model -> optimisers -> EMA -> task, callbacks -> resume -> loggers
    recipe.train()      # optimizer steps; periodic log, eval, checkpoint; signals and the time budget
    recipe.finish()     # full test eval with EMA weights, plots, final checkpoint
    recipe.close()      # tear down the process group (torchrun), unlock the folder

What varies plugs in from outside (DESIGN.md's seams): the model comes from athena.models.build (arch + model
transforms), a training task turns a batch into a loss (athena.training.tasks), callbacks add losses and
behaviour (athena.training.callbacks), an evaluator scores the test split (athena.eval.evaluators).

Under torchrun every rank runs the same recipe on its slice of each global batch (the samplers split it by
rank); gradients are summed over ranks after backward (athena.training.distributed). Rank 0 alone logs,
shows progress, writes checkpoints and the final eval files; every rank evaluates its shard of the test set.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from athena.checkpoint import remove_stale_temp_files
from athena.config import RunConfig, build_component
from athena.data.build import ensure_dataset
from athena.data.format import PuzzleDataset
from athena.data.sampler import PuzzleBatchSampler
from athena.device import autocast_for, start_clean
from athena.errors import AthenaError
from athena.eval.evaluators import EvalContext
from athena.eval.plots import plot_training_curve
from athena.models.build import build_run_model, check_adapter_has_base, fsdp_units, param_groups
from athena.training import distributed, run_state
from athena.training.callbacks import BUILTIN_CALLBACKS, Callback
from athena.training.compile import CompiledWithFallback
from athena.training.divergence import DivergenceGuard
from athena.training.ema import ModelEMA
from athena.training.loggers import build_loggers
from athena.training.run_folder import RunFolderLock
from athena.training.schedule import lr_multiplier

log = logging.getLogger("athena")

class TrainingStopped(AthenaError):
    """SIGTERM/Ctrl-C: a checkpoint was saved and the run stopped on purpose."""


def _default_signal(signum, frame, handler) -> None:
    """What `handler` (a signal's earlier disposition) does: call it, ignore the signal, or its default action."""
    if callable(handler):
        return handler(signum, frame)
    if handler == signal.SIG_IGN:
        return None
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return None


class PretrainRecipe:
    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg = cfg
        self.config_dict = cfg.resolved()  # every default filled in: config.json, checkpoints, W&B
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.step = 0
        self.batches_consumed = 0
        self.wandb_run_id: str | None = None
        self._stop_requested = False
        self.lock: RunFolderLock | None = None
        self.saved_step: int | None = None  # the step whose state this run's folder holds as last.pt
        self.finishing = False  # in finish(): the final save and evaluation
        self.step_sums: dict[str, torch.Tensor] = {}  # the last step's metric sums (callbacks read them)

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        self._lock_run_folder()
        self.dist, self.device = distributed.init(self.cfg.device)
        self.is_main = self.dist.is_main
        start_clean(self.device)  # a multirun's earlier jobs ran in this process
        self.guard = DivergenceGuard(self.checkpoint_dir, self.is_main, self.device)
        if self.dist.enabled:
            self._check_divisible()
            # Hydra's default run dir is a timestamp taken by each process: use rank 0's everywhere.
            self.run_dir = Path(distributed.broadcast_object(str(self.run_dir)))
            self.checkpoint_dir = self.guard.checkpoint_dir = self.run_dir / "checkpoints"
        check_adapter_has_base(self.cfg)  # before any data build or compute
        torch.manual_seed(self.cfg.seed)  # the same on every rank: identical initial weights
        self.precision, self.autocast = autocast_for(self.device, self.cfg.train.precision)
        self._setup_data()
        self._setup_model()
        self._maybe_shard()  # before the optimisers and the EMA: they must hold the (sharded) parameters
        self._setup_optimizers()
        self.ema = ModelEMA(self.ema_params(), self.cfg.train.ema_decay) if self.cfg.train.ema_decay else None
        self._setup_task_and_callbacks()
        self._setup_evaluator()
        if self.dist.enabled:
            # Halting exploration draws random numbers per slot: each rank its own stream (seed + rank).
            torch.manual_seed(self.cfg.seed + self.dist.rank)
        self._maybe_resume()
        if self.dist.enabled:
            distributed.broadcast_parameters(self.model)  # belt and braces: replicas start bit-identical
        self._setup_train_loader()
        self.loggers = build_loggers(self.cfg.logger, self.run_dir, self.config_dict, self.wandb_run_id, self.is_main)
        self.wandb_run_id = self.loggers.wandb_run_id or self.wandb_run_id
        if self.is_main:
            (self.run_dir / "config.json").write_text(json.dumps(self.config_dict, indent=2))

    def _lock_run_folder(self) -> None:
        """Rank 0 (the process that writes the folder; under torchrun its folder is the run's) takes the folder's
        lock before anything is written there, then removes the temp files a killed save left behind."""
        if not distributed.env_info().is_main:
            return
        self.lock = RunFolderLock(self.run_dir).acquire()
        stale = remove_stale_temp_files(self.checkpoint_dir) if self.checkpoint_dir.is_dir() else []
        if stale:
            log.info("removed %d partial checkpoint file(s) left by an interrupted save: %s", len(stale),
                     ", ".join(p.name for p in stale))

    def _check_divisible(self) -> None:
        t, world = self.cfg.train, self.dist.world_size
        if t.global_batch_size % (world * t.grad_accum_steps):
            raise AthenaError(f"train.global_batch_size {t.global_batch_size} must be divisible by "
                              f"world_size {world} x train.grad_accum_steps {t.grad_accum_steps}")
        if t.eval_batch_size % world:
            raise AthenaError(f"train.eval_batch_size {t.eval_batch_size} must be divisible by world_size {world}")

    def close(self) -> None:
        """Destroy the process group (a no-op in one process) and free the run folder; safe to call twice."""
        distributed.teardown()
        if self.lock is not None:
            self.lock.release()

    def _setup_data(self) -> None:
        self.data_dir = ensure_dataset(self.cfg.dataset_dir(), dict(self.cfg.data.build))
        self.train_set = PuzzleDataset(self.data_dir, "train")
        self.test_set = PuzzleDataset(self.data_dir, "test")
        self.metadata = self.train_set.metadata
        t = self.cfg.train
        probe = PuzzleBatchSampler(self.train_set, t.global_batch_size, train=True, seed=self.cfg.seed)
        self.examples_per_epoch = probe.examples_per_epoch
        self.total_steps = t.steps or max(1, math.ceil(t.epochs * self.examples_per_epoch / t.global_batch_size))
        log.info("data %s: %d train / %d test examples, seq_len %d, vocab %d (%s)", self.cfg.data.name,
                 len(self.train_set), len(self.test_set), self.metadata.seq_len, self.metadata.vocab_size, self.data_dir)

    def _setup_model(self) -> None:
        self.model = build_run_model(self.cfg, self.metadata).to(self.device)
        self.forward = self.model
        if self.cfg.train.compile:
            self.forward = CompiledWithFallback(self.model, self.cfg.train.compile_mode)
        dense, sparse = param_groups(self.model)  # trainable parameters only
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in dense + sparse)
        table = getattr(self.model, "puzzle_embedding", None)
        log.info("device %s (%s), model %s with %.2fM parameters (%.2fM in the puzzle embedding)",
                 self.device, self.precision, type(self.model).__name__, total / 1e6,
                 sum(p.numel() for p in table.parameters()) / 1e6 if table is not None else 0.0)
        log.info("trainable parameters: %d of %d (%.3f%%), adapter=%s", trainable, total, 100 * trainable / max(total, 1),
                 self.cfg.adapter.name)

    def _maybe_shard(self) -> None:
        """train.parallel=fsdp under torchrun: FSDP2 over every rank (distributed.shard_model). One process: a
        warning, then the plain single-process run (the checkpoints are the same either way)."""
        if self.cfg.train.parallel != "fsdp":
            return
        if not self.dist.enabled:
            log.warning("train.parallel=fsdp needs torchrun with more than one process; running as one process")
            return
        if self.cfg.adapter.name != "none":
            raise AthenaError(f"adapter={self.cfg.adapter.name} is not supported with train.parallel=fsdp yet; "
                              "use train.parallel=ddp")
        distributed.shard_model(self.model, self.device, fsdp_units(self.model), sparse=param_groups(self.model)[1])
        log.info("FSDP2: dense weights, gradients and optimizer state sharded over %d processes; the puzzle "
                 "embedding is replicated", self.dist.world_size)

    def _setup_optimizers(self) -> None:
        dense, sparse = param_groups(self.model)
        node = self.cfg.optimizer.model.model_dump(by_alias=True, exclude_none=True)
        if "fused" in self.cfg.optimizer.model.model_fields_set and self.cfg.optimizer.model.fused is None:
            node["fused"] = self.device.type == "cuda"
        self.optimizers = [instantiate(node)(dense)]
        if sparse:
            sparse_node = self.cfg.optimizer.puzzle_embedding.model_dump(by_alias=True, exclude_none=True)
            self.optimizers.append(instantiate(sparse_node)(sparse))
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["peak_lr"] = group["lr"]
        self.dense_params, self.sparse_params = dense, sparse

    def ema_params(self) -> dict[str, torch.nn.Parameter]:
        sparse_ids = {id(p) for p in param_groups(self.model)[1]}
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in sparse_ids}

    def _setup_task_and_callbacks(self) -> None:
        t = self.cfg.train
        self.task = build_component(self.cfg.task)
        self.task.global_batch_size = t.global_batch_size
        self.task.setup(self.model, t.grad_accum_steps, self.device)
        built_in = [make(self.cfg) for make in BUILTIN_CALLBACKS]
        own = [build_component(node) for node in self.cfg.callbacks]
        self.callbacks: list[Callback] = [cb for cb in built_in + own if cb is not None]
        for callback in self.callbacks:
            callback.on_setup(self)

    def set_trainable(self, params: list[torch.nn.Parameter], trainable: bool) -> None:
        """Freeze or unfreeze parameters mid-run (callbacks). Only what trained at the start can train again: the
        optimisers hold exactly that set. Frozen parameters get no gradient, so the optimisers skip them (no update,
        no weight decay, moments kept for when they thaw), gradient sync leaves them out and the EMA stops
        averaging them."""
        training = {id(p) for p in self.dense_params + self.sparse_params}
        outside = [p for p in params if id(p) not in training]
        if trainable and outside:
            raise AthenaError(f"set_trainable: {len(outside)} parameter(s) were not trained from the start of this "
                              "run (e.g. a frozen adapter base); only those can be frozen and unfrozen")
        for p in params:
            p.requires_grad_(trainable)

    def _setup_evaluator(self) -> None:
        self.evaluator = build_component(self.cfg.evaluator)

    def _setup_train_loader(self) -> None:
        t = self.cfg.train
        self.train_sampler = PuzzleBatchSampler(self.train_set, t.global_batch_size, train=True, seed=self.cfg.seed,
                                                rank=self.dist.rank, world_size=self.dist.world_size,
                                                start_batch=self.batches_consumed)
        self.train_loader = DataLoader(self.train_set, sampler=self.train_sampler, batch_size=None,
                                       num_workers=t.num_workers, pin_memory=self.device.type == "cuda",
                                       persistent_workers=t.num_workers > 0, generator=self._loader_generator())

    def eval_loader(self, max_examples: int | None) -> DataLoader:
        sampler = PuzzleBatchSampler(self.test_set, self.cfg.train.eval_batch_size, train=False, seed=self.cfg.seed,
                                     rank=self.dist.rank, world_size=self.dist.world_size, max_examples=max_examples)
        return DataLoader(self.test_set, sampler=sampler, batch_size=None, num_workers=0,
                          pin_memory=self.device.type == "cuda", generator=self._loader_generator())

    def _loader_generator(self) -> torch.Generator:
        """Each iter(DataLoader) draws a worker seed from its generator, by default the GLOBAL one, which also
        drives halting exploration: a resumed run (which creates its iterator after restoring the RNG) or a
        periodic eval would then shift that stream. A private generator keeps training's stream untouched."""
        return torch.Generator().manual_seed(self.cfg.seed + self.dist.rank)

    # ----------------------------------------------------------------- checkpoints (athena.training.run_state)
    def state_dict(self) -> dict[str, Any]:
        return run_state.state_dict(self)

    def save(self, window: dict[str, torch.Tensor] | None = None) -> Path:
        return run_state.save(self, window)

    def _maybe_resume(self) -> None:
        run_state.resume(self)

    # ----------------------------------------------------------------- training
    def _set_lr(self) -> float:
        t = self.cfg.train
        factor = lr_multiplier(self.step, warmup_steps=t.lr_warmup_steps, total_steps=self.total_steps,
                               kind=t.lr_schedule, min_ratio=t.lr_min_ratio)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * factor
        return self.optimizers[0].param_groups[0]["lr"]

    def _train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimizer step over the (local) batch; returns device-side metric sums (no host sync)."""
        t = self.cfg.train
        lr = self._set_lr()
        sums: dict[str, torch.Tensor] = {}
        self.task.begin_step(batch)
        micro_batches = zip(*(v.chunk(t.grad_accum_steps) for v in batch.values()))
        for i, parts in enumerate(micro_batches):
            part = dict(zip(batch.keys(), parts))
            with self.autocast():
                loss, metrics = self.task.step(self.forward, i, part)
            fraction = next(iter(part.values())).shape[0] / t.global_batch_size
            for callback in self.callbacks:
                for name, aux in callback.aux_losses(self.model, fraction).items():
                    loss = loss + aux
                    metrics[name] = aux.detach().double()
            loss.backward()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0) + value
        # Each rank's loss is already divided by the GLOBAL batch size: summing the ranks' gradients gives the
        # gradient of the global batch (a no-op in one process). After it every rank clips the same gradient.
        distributed.sync_gradients(self.dense_params, self.sparse_params)
        for callback in self.callbacks:
            callback.on_after_backward(self, self.step + 1)
        max_norm = t.grad_clip if t.grad_clip is not None else float("inf")
        grad_norm = distributed.clip_grad_norm(self.dense_params, max_norm)  # also over FSDP's sharded grads
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update()
        sums["grad_norm"] = grad_norm.detach().double()
        sums["lr"] = torch.tensor(lr, dtype=torch.float64)
        return sums

    def _reduce_window(self, window: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum the per-rank metric sums over ranks (one all-reduce); grad_norm and lr are already global."""
        if not self.dist.enabled:
            return window
        keys = sorted(k for k in window if k not in ("grad_norm", "lr"))
        stacked = torch.stack([torch.as_tensor(window[k], dtype=torch.float64, device=self.device) for k in keys])
        distributed.all_reduce_sum(stacked)
        return {**window, **dict(zip(keys, stacked.unbind()))}

    def _summarise(self, window: dict[str, torch.Tensor], n_steps: int, seconds: float) -> dict[str, float]:
        """The logged metrics of a window of steps: the task's, then every other key as its mean per step
        (callbacks' aux losses, ...), then the loop's own."""
        values = {k: v.item() if torch.is_tensor(v) else float(v) for k, v in self._reduce_window(window).items()}
        loop = {"grad_norm": values.pop("grad_norm"), "lr": values.pop("lr")}
        out = self.task.summarise(values, n_steps, seconds)  # consumes its keys
        out.update({f"train/{k}": v / n_steps for k, v in values.items()})
        out["train/grad_norm"] = loop["grad_norm"] / n_steps
        out["train/lr"] = loop["lr"] / n_steps
        out["train/samples_per_s"] = n_steps * self.cfg.train.global_batch_size / max(seconds, 1e-9)
        out["train/epoch"] = self.batches_consumed * self.cfg.train.global_batch_size / self.examples_per_epoch
        if self.device.type == "cuda":
            out["train/peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        for callback in self.callbacks:
            out.update(callback.on_log(self.step, out))
        return out

    def _on_signal(self, signum, frame) -> None:
        log.warning("received signal %d: saving a checkpoint after this step, then stopping", signum)
        self._stop_requested = True

    @contextmanager
    def signals_stop_now(self):
        """Outside the training loop (set-up, the final evaluation) there is no step to finish: SIGTERM / Ctrl-C stop
        the run at once, with one line saying what is kept. Inside it the loop's own handler (_signals_saved) takes
        over and restores this one after."""

        owner = os.getpid()

        def stop(signum, frame):
            if os.getpid() != owner:  # a forked worker (a DataLoader's; the dataset builder's pool resets its
                return _default_signal(signum, frame, previous[signum])  # own) keeps the default behaviour
            raise TrainingStopped(self._stopped_outside_the_loop(signal.Signals(signum).name))

        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _stopped_outside_the_loop(self, name: str) -> str:
        last = self.checkpoint_dir / "last.pt"
        if self.finishing and self.saved_step == self.step:
            return (f"stopped by {name} during the final evaluation; the weights of step {self.step} are saved: "
                    f"evaluate them with python evaluate.py checkpoint={last}")
        if self.finishing or self.step:  # the final save cut off (its temp file goes at the next start), or resumed
            return (f"stopped by {name} before step {self.step} was saved or continued; what the folder holds is "
                    f"kept: continue with resume=auto hydra.run.dir={self.run_dir}")
        return f"stopped by {name} during set-up, before any training step; nothing to keep: run the command again"

    @contextmanager
    def _signals_saved(self):
        """SIGTERM / Ctrl-C ask for a checkpoint after the current step instead of killing the run."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def train(self) -> None:
        t = self.cfg.train
        self._window: dict[str, torch.Tensor] = {}
        self._window_steps, self._window_start = 0, time.perf_counter()
        deadline = time.perf_counter() + 60 * t.max_minutes if t.max_minutes else math.inf
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True, mininterval=2.0,
                   disable=not self.is_main)
        batches = iter(self.train_loader)
        if t.eval_at_start and self.step == 0:
            self._periodic_eval(bar)
        with self._signals_saved():
            try:
                while self.step < self.total_steps:
                    batch = next(batches)
                    position = batch.pop("position")
                    for callback in self.callbacks:  # e.g. rehearsal mixes stored samples of earlier tasks in
                        batch = callback.on_batch(self, self.step + 1, batch)
                    sums = self._train_step({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
                    self.step_sums = sums  # what callbacks read at on_step_end (a loss spike, ...)
                    self.step += 1
                    self.batches_consumed = position + 1
                    for key, value in sums.items():
                        self._window[key] = self._window.get(key, 0) + value
                    self._window_steps += 1
                    bar.update(1)
                    for callback in self.callbacks:
                        callback.on_step_end(self, self.step)
                    at_log_step = self.step % t.log_every == 0 or self.step == self.total_steps
                    if at_log_step:
                        self._log_window(bar)
                    if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                        self._periodic_eval(bar)
                    stop = self._stop_agreed(at_log_step)
                    if (t.checkpoint_every and self.step % t.checkpoint_every == 0) or stop:
                        path = self.save(self._window)
                    if stop:
                        raise TrainingStopped(f"stopped by a signal at step {self.step}; checkpoint saved to {path}; "
                                              f"continue with resume=auto hydra.run.dir={self.run_dir}")
                    if self._out_of_time(deadline, at_log_step):
                        log.info("train.max_minutes=%s reached at step %d: stopping training", t.max_minutes,
                                 self.step)
                        self.total_steps = self.step
                        break
            finally:
                bar.close()

    def _log_window(self, bar) -> None:
        metrics = self._summarise(self._window, self._window_steps, time.perf_counter() - self._window_start)
        self.guard.check_metrics(metrics, self.step)
        self.loggers.log(metrics, self.step)
        shown = {"loss": metrics.get("train/lm_loss", metrics.get("train/loss")),  # TRM's token loss; else the loss
                 "exact": metrics.get("train/exact_accuracy"), "tok/s": metrics.get("train/tokens_per_s")}
        bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if v is not None})
        self._window, self._window_steps, self._window_start = {}, 0, time.perf_counter()

    def _periodic_eval(self, bar) -> None:
        report = self.evaluate(max_examples=self.cfg.train.eval_examples)
        metrics = report.metrics()
        self.loggers.log(metrics, self.step)
        for callback in self.callbacks:
            callback.on_eval(self.step, metrics)
        if self.is_main:
            bar.write(f"step {self.step}: eval {report.headline()} (n={metrics.get('eval/count', '?')})")

    def _stop_agreed(self, at_log_step: bool) -> bool:
        if not self.dist.enabled:
            return self._stop_requested
        # A signal may reach the ranks at different steps: they agree at log steps (no per-step sync).
        return at_log_step and distributed.any_rank(self._stop_requested, self.device)

    def _out_of_time(self, deadline: float, at_log_step: bool) -> bool:
        out_of_time = time.perf_counter() > deadline
        if self.dist.enabled and self.cfg.train.max_minutes:  # rank 0's clock decides, at log steps
            out_of_time = at_log_step and distributed.broadcast_object(out_of_time)
        return out_of_time

    # ----------------------------------------------------------------- evaluation
    def evaluate(self, max_examples: int | None, progress: bool = False):
        """The evaluator's report on (a subsample of) the test split, with the EMA weights when on."""
        ema = self.ema.applied() if self.ema else nullcontext()
        # FSDP keeps the weights it gathered for a forward without backward: drop them around eval, so eval
        # gathers the EMA weights and the next training step the trained ones (a no-op without FSDP).
        distributed.reshard(self.model)
        try:
            with ema:
                pad_to = self.cfg.train.eval_batch_size // self.dist.world_size  # one shape for the compiled model
                context = EvalContext(
                    model=self.model, forward=self.forward, loader=self.eval_loader(max_examples), device=self.device,
                    data_dir=self.data_dir, autocast=self.autocast, progress=progress,
                    pad_to=pad_to if self.cfg.train.compile else None, gather=distributed.gather_objects)
                return self.evaluator.evaluate(context)
        finally:
            distributed.reshard(self.model)

    def finish(self):
        """Full test split with the EMA weights; eval/final.json, plots, callbacks' last word, a last checkpoint."""
        # Every rank knows what this run saved, so all take part in save()'s gather and barrier or none does. (Not
        # "step_N.pt exists": a file from an earlier attempt that diverged after it is not this run's state.)
        self.finishing = True
        if self.saved_step != self.step:
            self.save()
        report = self.evaluate(max_examples=None, progress=self.is_main)  # every rank: its shard, sums all-reduced
        self.loggers.log(report.metrics(), self.step)
        for callback in self.callbacks:
            callback.on_finish(self)
        if not self.is_main:
            self.loggers.finish()
            return report
        eval_dir = self.run_dir / "eval"
        eval_dir.mkdir(parents=True, exist_ok=True)
        (eval_dir / "final.json").write_text(json.dumps({"step": self.step, **report.summary()}, indent=2))
        images = report.plots(eval_dir, title=f"{self.cfg.data.name}, step {self.step}")
        curve = plot_training_curve(self.run_dir / "metrics.jsonl", eval_dir / "training_curve.png")
        if curve:
            images["eval/training_curve"] = curve
        self.loggers.log_images(images, self.step)
        self.loggers.finish()
        return report
