"""The pretraining recipe: explicit setup steps, one training loop, evaluation, checkpoints.

    recipe = PretrainRecipe(run_config, run_dir, resolved_config_dict)
    recipe.setup()      # data -> model -> optimisers -> EMA -> resume -> loggers
    recipe.train()      # deep supervision through the carry; periodic eval + checkpoints
    recipe.finish()     # full test eval with EMA weights, plots, final checkpoint
    recipe.close()      # tear down the process group (torchrun)

Under torchrun every rank runs the same recipe on its slice of each global batch (the samplers split it by
rank); gradients are summed over ranks after backward (athena.training.distributed). Rank 0 alone logs,
shows progress, writes checkpoints and the final eval files; every rank evaluates its shard of the test set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from athena.config import AdapterNode, ConfigError, RunConfig
from athena.data.build import ensure_dataset
from athena.data.format import PuzzleBatchSampler, PuzzleDataset
from athena.errors import AthenaError
from athena.eval.plots import plot_accuracy_by_step, plot_training_curve
from athena.eval.puzzle_eval import PuzzleEvalResult, evaluate_puzzles
from athena.models.trm import SupervisionCarry
from athena.training import distributed
from athena.training.checkpoint import (
    CheckpointError, check_weights_fit, find_resume_checkpoint, load_checkpoint, load_weights, model_weights,
    point_last_at, remove_stale_temp_files, resolve_checkpoint_path, rng_state, save_checkpoint, set_rng_state,
    step_files,
)
from athena.training.ema import ModelEMA
from athena.training.loggers import build_loggers
from athena.training.run_folder import RunFolderLock
from athena.training.schedule import lr_multiplier

log = logging.getLogger("athena")

# Config sections that must match for a checkpoint to continue this run.
_MUST_MATCH = ("arch", "data", "adapter")


class TrainingDiverged(AthenaError, RuntimeError):
    """Loss or gradient norm stopped being finite."""


class TrainingStopped(AthenaError):
    """SIGTERM/Ctrl-C: a checkpoint was saved and the run stopped on purpose."""


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def copy_out(value):
    """A copy of every tensor in (nested dataclasses, dicts, tuples, lists of) `value`; other leaves as they are."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: copy_out(getattr(value, f.name)) for f in dataclasses.fields(value)
                                             if f.init})
    if isinstance(value, dict):
        return {k: copy_out(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(copy_out(v) for v in value)
    return value


class CompiledWithFallback:
    """torch.compile(module), falling back to eager with one warning if compilation fails.

    CUDA-graph modes (reduce-overhead, max-autotune): each call starts a new graph step and copies the outputs out of
    the graph pool, which the next replay overwrites: the ACT carry returned by one step is the next step's input
    (without the copy the first replay fails with "accessing tensor output of CUDAGraphs that has been overwritten").
    The copy is two (B, L, hidden) states per step: ~150 MB at batch 768 in bf16, ~0.1 ms on an H100 (estimate)."""

    def __init__(self, module: torch.nn.Module, mode: str = "default"):
        self.module = module
        self.compiled = torch.compile(module, mode=None if mode == "default" else mode)
        self.cuda_graphs = mode in CUDA_GRAPH_MODES
        self.failed = False

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                if self.cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                    return copy_out(self.compiled(*args, **kwargs))
                return self.compiled(*args, **kwargs)
            except Exception as error:  # compiler or backend missing on this machine
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
                log.warning("torch.compile failed (%s); continuing in eager mode", reason)
                self.failed = True
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.module, name)


def autocast_for(device: torch.device, precision: str):
    """(resolved precision, a factory of the context to run forwards in): `auto` is bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return precision, partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    return precision, nullcontext


def dataset_dir(cfg: RunConfig) -> Path:
    """data.dir, or <data_root>/<name>-<hash of the build spec> so each recipe gets its own cache."""
    if cfg.data.dir:
        return Path(cfg.data.dir)
    digest = hashlib.sha1(json.dumps(cfg.data.build, sort_keys=True).encode()).hexdigest()[:8]
    return Path(cfg.data_root) / f"{cfg.data.name}-{digest}"


def build_model(cfg: RunConfig, metadata) -> torch.nn.Module:
    """The arch node's `_target_`, sized by the dataset (vocab, sequence length, puzzle ids)."""
    arch = cfg.arch.model_dump(by_alias=True)
    arch.pop("_partial_", None)
    try:
        return instantiate(arch, vocab_size=metadata.vocab_size, seq_len=metadata.seq_len,
                           num_puzzle_identifiers=metadata.num_puzzle_identifiers)
    except InstantiationException as error:  # the model's own argument checks (ValueError) come wrapped
        cause = error.__cause__
        if isinstance(cause, ValueError):
            raise ConfigError(f"invalid config: arch: {cause}") from None
        raise


def check_adapter_has_base(cfg: RunConfig, resuming: bool | None = None) -> None:
    """A frozen base needs pretrained weights: stop (one line, before any data or compute) instead of training
    adapters on a random network. Resuming an adapter run is fine without init_from (the checkpoint holds the
    base); `resuming` None means "if resume is set" (resume=auto that finds nothing checks again, as False)."""
    adapter = cfg.adapter
    resuming = cfg.resume != "none" if resuming is None else resuming
    if adapter.name != "none" and adapter.freeze_base and not cfg.init_from and not resuming:
        raise ConfigError(
            f"adapter={adapter.name} freezes the base but init_from is not set: adapters would train on a random "
            "network; set init_from=<pretrained checkpoint> or adapter.freeze_base=false"
        )


def attach_adapter(model: torch.nn.Module, adapter: AdapterNode) -> torch.nn.Module:
    """athena.adapters.add_adapters(model, AdapterConfig(method=adapter.name, ...)), in place; a no-op for `none`.
    Call after the base weights are loaded (init_from) and before loading an adapter run's own state dict."""
    if adapter.name == "none":
        return model
    from athena.adapters import AdapterConfig, AdapterConfigError, add_adapters

    try:
        return add_adapters(model, AdapterConfig(**adapter.adapter_kwargs()))
    except AdapterConfigError as error:
        raise ConfigError(f"adapter={adapter.name}: {error}") from None


def carry_to_state(carry: SupervisionCarry | None) -> dict[str, Any] | None:
    return None if carry is None else {f.name: getattr(carry, f.name) for f in fields(carry)}


def carry_from_state(state: dict[str, Any] | None, device: torch.device) -> SupervisionCarry | None:
    if state is None:
        return None
    moved = {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device))
             for k, v in state.items()}
    return SupervisionCarry(**moved)


class PretrainRecipe:
    def __init__(self, cfg: RunConfig, run_dir: Path, config_dict: dict[str, Any]):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.config_dict = config_dict
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.step = 0
        self.batches_consumed = 0
        # One carry per gradient-accumulation micro-batch: each is its own set of puzzle slots.
        self.carries: list[SupervisionCarry | None] = [None] * cfg.train.grad_accum_steps
        self.wandb_run_id: str | None = None
        self._stop_requested = False
        self.adapter_on = cfg.adapter.name != "none"
        self.lock: RunFolderLock | None = None
        self.finite_through = 0  # the loss of every step up to this one was checked finite
        self.saved_step: int | None = None  # the step whose state this run's folder holds as last.pt

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        self._lock_run_folder()
        self.dist, self.device = distributed.init(self.cfg.device)
        self.is_main = self.dist.is_main
        if self.dist.enabled:
            self._check_divisible()
            # Hydra's default run dir is a timestamp taken by each process: use rank 0's everywhere.
            self.run_dir = Path(distributed.broadcast_object(str(self.run_dir)))
            self.checkpoint_dir = self.run_dir / "checkpoints"
        check_adapter_has_base(self.cfg)  # before any data build or compute
        torch.manual_seed(self.cfg.seed)  # the same on every rank: identical initial weights
        self.precision, self.autocast = autocast_for(self.device, self.cfg.train.precision)
        self._setup_data()
        self._setup_model()
        self._maybe_shard()  # before the optimisers and the EMA: they must hold the (sharded) parameters
        self._setup_optimizers()
        self.ema = ModelEMA(self._ema_params(), self.cfg.train.ema_decay) if self.cfg.train.ema_decay else None
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

    def _lock_run_folder(self) -> None:
        """Rank 0 (the process that writes the folder; under torchrun its folder is the run's) takes the folder's
        lock before anything is written there, then removes the temp files a killed save left behind."""
        self.lock = None
        if not distributed.env_info().is_main:
            return
        self.lock = RunFolderLock(self.run_dir).acquire()
        stale = remove_stale_temp_files(self.checkpoint_dir) if self.checkpoint_dir.is_dir() else []
        if stale:
            log.info("removed %d partial checkpoint file(s) left by an interrupted save: %s", len(stale),
                     ", ".join(p.name for p in stale))

    def _setup_data(self) -> None:
        self.data_dir = ensure_dataset(dataset_dir(self.cfg), dict(self.cfg.data.build))
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
        model = build_model(self.cfg, self.metadata)
        if self.cfg.init_from:
            self._load_init_weights(model, Path(self.cfg.init_from))
        model = attach_adapter(model, self.cfg.adapter)  # after init_from: the checkpoint is a base (no adapter keys)
        if self.adapter_on:
            from athena.adapters import adapter_aux_loss

            self._adapter_aux_loss = adapter_aux_loss  # router losses of the grad-enabled forwards since last call
        self.model = model.to(self.device)
        self.forward = self.model
        if self.cfg.train.compile:
            self.forward = CompiledWithFallback(self.model, self.cfg.train.compile_mode)
        dense, sparse = self.model.param_groups()  # trainable parameters only
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in dense + sparse)
        table = getattr(self.model, "puzzle_embedding", None)
        log.info("device %s (%s), model %s with %.2fM parameters (%.2fM in the puzzle embedding)",
                 self.device, self.precision, type(model).__name__, total / 1e6,
                 sum(p.numel() for p in table.parameters()) / 1e6 if table is not None else 0.0)
        log.info("trainable parameters: %d of %d (%.3f%%), adapter=%s", trainable, total, 100 * trainable / max(total, 1),
                 self.cfg.adapter.name)

    def _load_init_weights(self, model: torch.nn.Module, path: Path) -> None:
        state = load_checkpoint(path)
        # The EMA weights are the ones evaluated and shipped.
        weights = model_weights(state, "ema" if state.get("ema") else "raw")
        load_weights(model, weights, f"init_from={path}{self._trained_with(state, ('arch', 'data'))}")
        log.info("initialised weights from %s", path)

    def _trained_with(self, state: dict[str, Any], sections: tuple[str, ...]) -> str:
        """' (trained with arch.hidden_size=64, this run 32)': the config keys that explain a misfit, if known."""
        saved = state.get("config") or {}
        keys = differing_keys(saved, self.config_dict, sections)
        if not keys:
            return ""
        shown = [f"{k}={_lookup(saved, k)!r}, this run {_lookup(self.config_dict, k)!r}" for k in keys[:2]]
        return f" (trained with {'; '.join(shown)})"

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
        distributed.shard_model(self.model, self.device)
        log.info("FSDP2: dense weights, gradients and optimizer state sharded over %d processes; the puzzle "
                 "embedding is replicated", self.dist.world_size)

    def _setup_optimizers(self) -> None:
        dense, sparse = self.model.param_groups()
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

    def _ema_params(self) -> dict[str, torch.nn.Parameter]:
        sparse_ids = {id(p) for p in self.model.param_groups()[1]}
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in sparse_ids}

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

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint. Weights, EMA and optimizer state are identical on every rank; the carries (puzzle slots)
        and RNG streams are per rank. One process: `carries` is its list of carries and `rng` its RNG state, as
        always. Under torchrun (call on EVERY rank, the result is for rank 0): `carries` and `rank_rng` hold
        every rank's, indexed by rank, and `rng` is rank 0's, so a resume with the same world size continues
        exactly; any other world size restarts the slots with fresh carries (see _maybe_resume)."""
        carries = [carry_to_state(carry) for carry in self.carries]
        state = {
            "model": distributed.model_state(self.model),  # full tensors, also under FSDP (rank 0 holds them)
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizers": [distributed.optimizer_state(opt) for opt in self.optimizers],
            "step": self.step,
            "batches_consumed": self.batches_consumed,
            "carries": carries,
            "rng": rng_state(),
            "config": self.config_dict,
            "wandb_run_id": self.wandb_run_id,
            "world_size": self.dist.world_size,
        }
        if self.dist.enabled:
            cpu = [None if c is None else {k: ({kk: vv.cpu() for kk, vv in v.items()} if isinstance(v, dict)
                                               else v.cpu()) for k, v in c.items()} for c in carries]
            gathered = distributed.gather_objects({"carries": cpu, "rng": state["rng"]})
            if gathered is not None:
                state["carries"] = [g["carries"] for g in gathered]
                state["rank_rng"] = [g["rng"] for g in gathered]
        return state

    def save(self, window: dict[str, torch.Tensor] | None = None) -> Path:
        """Rank 0 writes; the other ranks wait for it at a barrier (so nobody reads a half-written run).

        Refuses (TrainingDiverged) to write weights, EMA or a loss since the last check (`window`) that are not
        finite: every checkpoint on disk is one a run can continue from, and last.pt stays the last good one."""
        self._check_finite_state(window)
        state = self.state_dict()  # every rank: it gathers the per-rank carries
        path = self.checkpoint_dir / f"step_{self.step}.pt"
        if self.is_main:
            path = save_checkpoint(state, self.checkpoint_dir, self.step, self.cfg.train.keep_checkpoints)
            log.info("saved checkpoint %s", path)
        distributed.barrier()
        self.saved_step = self.step
        return path

    def _maybe_resume(self) -> None:
        resume = self.cfg.resume
        if resume == "none":
            return
        if resume == "auto":
            path = find_resume_checkpoint(self.checkpoint_dir)
            if path is None:
                check_adapter_has_base(self.cfg, resuming=False)
                log.info("resume=auto: no checkpoint in %s, starting fresh", self.checkpoint_dir)
                return
        else:
            path = resolve_checkpoint_path(resume)  # a file, or a run folder's newest checkpoint
        state = load_checkpoint(path)
        if state["format"] == "weights-only":
            check_weights_fit(self.model, state["model"], f"resume={path} (a bare state dict)")
            distributed.load_model_state(self.model, state["model"])
            if self.ema:  # the EMA starts from the loaded weights, not from the random initialisation
                self.ema = ModelEMA(self._ema_params(), self.cfg.train.ema_decay)
            log.warning("%s holds weights only: optimizer, EMA and data position start fresh", path)
            return
        self._check_config_matches(state.get("config") or {}, path)
        check_weights_fit(self.model, state["model"], f"resume={path}")
        distributed.load_model_state(self.model, state["model"])  # full state in, each rank's shard under FSDP
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        for opt, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
            distributed.load_optimizer_state(opt, opt_state)
        self.step = self.finite_through = state["step"]
        if Path(path).resolve().parent == self.checkpoint_dir.resolve():
            self.saved_step = self.step  # continuing in the folder that holds this state already
        self.batches_consumed = state["batches_consumed"]
        self.wandb_run_id = state.get("wandb_run_id")
        saved_world, world, rank = state.get("world_size", 1), self.dist.world_size, self.dist.rank
        if saved_world != world:
            # Carries are per-rank slot state: they cannot be re-split for another world size. The data position,
            # weights and optimizer state carry over; only the in-flight puzzles restart.
            log.warning("%s was written by %d process(es), this run has %d: puzzle slots restart from fresh "
                        "carries", path, saved_world, world)
            if rank == 0:
                set_rng_state(state["rng"])
            # Other ranks keep their seed + rank stream (set in setup).
        else:
            saved = state.get("carries") or []
            saved = saved if world == 1 else saved[rank]
            carries = [carry_from_state(c, self.device) for c in saved or []]
            if len(carries) == len(self.carries):
                self.carries = carries
            else:
                log.warning("grad_accum_steps changed since %s: puzzle slots restart from fresh carries", path)
            set_rng_state(state["rank_rng"][rank] if world > 1 else state["rng"])
        log.info("resumed from %s at step %d", path, self.step)

    def _check_config_matches(self, saved: dict[str, Any], path: Path) -> None:
        differing = differing_keys(saved, self.config_dict, _MUST_MATCH)
        if differing:
            raise CheckpointError(
                f"checkpoint {path} was trained with a different config ({', '.join(differing[:6])}); "
                "resume with the same arch/data/adapter, or use init_from= to start a new run from its weights"
            )

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
        micro_batches = zip(*(v.chunk(t.grad_accum_steps) for v in batch.values()))
        for i, parts in enumerate(micro_batches):
            part = dict(zip(batch.keys(), parts))
            carry = self.carries[i] or self.model.initial_carry(part)
            with self.autocast():
                self.carries[i], out = self.forward(carry, part)
            del carry  # the old carry is dead: let backward run without it (the official's step does the same)
            loss = out.loss
            if self.adapter_on:
                # Router losses are means over tokens; our loss is a SUM over samples (divided by the global batch
                # size below), so weigh the micro-batch's router loss by its sample count.
                router = self._adapter_aux_loss(self.model)
                if router is not None:
                    router = router.float() * part["inputs"].shape[0]
                    loss = loss + router
                    sums["router_loss"] = sums.get("router_loss", 0) + router.detach().double()
            (loss / t.global_batch_size).backward()
            for key, value in out.metrics.items():
                sums[key] = sums.get(key, 0) + value.detach().double()
            sums["loss"] = sums.get("loss", 0) + out.loss.detach().double()
        # Each rank's loss is already divided by the GLOBAL batch size: summing the ranks' gradients gives the
        # gradient of the global batch (a no-op in one process). After it every rank clips the same gradient.
        distributed.sync_gradients(self.dense_params, self.sparse_params)
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
        window = self._reduce_window(window)
        values = {k: v.item() if torch.is_tensor(v) else float(v) for k, v in window.items()}
        count = max(1.0, values.get("count", 0.0))
        out = {f"train/{k}": values[k] / count for k in
               ("lm_loss", "q_halt_loss", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps") if k in values}
        out["train/loss"] = values["loss"] / (n_steps * self.cfg.train.global_batch_size)
        if "router_loss" in values:
            out["train/router_loss"] = values["router_loss"] / (n_steps * self.cfg.train.global_batch_size)
        out["train/grad_norm"] = values["grad_norm"] / n_steps
        out["train/lr"] = values["lr"] / n_steps
        out["train/halted_per_step"] = values.get("count", 0.0) / n_steps
        out["train/samples_per_s"] = n_steps * self.cfg.train.global_batch_size / max(seconds, 1e-9)
        out["train/epoch"] = self.batches_consumed * self.cfg.train.global_batch_size / self.examples_per_epoch
        if self.device.type == "cuda":
            out["train/peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def _on_signal(self, signum, frame) -> None:
        log.warning("received signal %d: saving a checkpoint after this step, then stopping", signum)
        self._stop_requested = True

    def train(self) -> None:
        t = self.cfg.train
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        window: dict[str, torch.Tensor] = {}
        window_steps, window_start = 0, time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True, mininterval=2.0,
                   disable=not self.is_main)
        batches = iter(self.train_loader)
        deadline = time.perf_counter() + 60 * t.max_minutes if t.max_minutes else math.inf
        try:
            while self.step < self.total_steps:
                batch = next(batches)
                position = batch.pop("position")
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                sums = self._train_step(batch)
                self.step += 1
                self.batches_consumed = position + 1
                for key, value in sums.items():
                    window[key] = window.get(key, 0) + value
                window_steps += 1
                bar.update(1)

                at_log_step = self.step % t.log_every == 0 or self.step == self.total_steps
                stop = self._stop_requested
                if self.dist.enabled:
                    # A signal may reach the ranks at different steps: they agree at log steps (no per-step sync).
                    stop = at_log_step and distributed.any_rank(self._stop_requested, self.device)
                if at_log_step:
                    metrics = self._summarise(window, window_steps, time.perf_counter() - window_start)
                    self._check_finite(metrics)
                    self.loggers.log(metrics, self.step)
                    bar.set_postfix(loss=f"{metrics['train/lm_loss']:.3f}" if "train/lm_loss" in metrics else "-",
                                    exact=f"{metrics.get('train/exact_accuracy', 0):.3f}")
                    window, window_steps, window_start = {}, 0, time.perf_counter()
                if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                    result = self.evaluate(max_examples=t.eval_examples)
                    self.loggers.log(result.metrics(), self.step)
                    if self.is_main:
                        bar.write(f"step {self.step}: eval exact accuracy {100 * result.exact_accuracy:.1f}% "
                                  f"(token {100 * result.token_accuracy:.1f}%, n={result.count})")
                if (t.checkpoint_every and self.step % t.checkpoint_every == 0) or stop:
                    path = self.save(window)
                if stop:
                    raise TrainingStopped(f"stopped by a signal at step {self.step}; checkpoint saved to {path}; "
                                          f"continue with resume=auto hydra.run.dir={self.run_dir}")
                out_of_time = time.perf_counter() > deadline
                if self.dist.enabled and t.max_minutes:  # rank 0's clock decides, at log steps
                    out_of_time = at_log_step and distributed.broadcast_object(out_of_time)
                if out_of_time:
                    log.info("train.max_minutes=%s reached at step %d: stopping training", t.max_minutes, self.step)
                    self.total_steps = self.step
                    break
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _check_finite(self, metrics: dict[str, float]) -> None:
        bad = [k for k in ("train/loss", "train/grad_norm") if not math.isfinite(metrics[k])]
        if bad:
            self._diverged(f"{bad[0]} became {metrics[bad[0]]}")
        self.finite_through = self.step

    def _check_finite_state(self, window: dict[str, torch.Tensor] | None) -> None:
        """Weights, EMA and the loss summed since the last check all finite, on every rank (one flag all-reduced)."""
        tensors = [p.detach() for p in self.model.parameters()]
        if self.ema:
            tensors += list(self.ema.shadow.values())
        if window and "loss" in window:
            tensors.append(torch.as_tensor(window["loss"]))
        local = [distributed.local_tensor(t) for t in tensors]
        finite = torch.stack([torch.isfinite(t).all() for t in local if t.numel()]).all().item()
        if distributed.any_rank(not finite, self.device):
            self._diverged("the weights, EMA or loss stopped being finite")
        self.finite_through = self.step

    def _diverged(self, what: str) -> None:
        """Stop, naming the newest checkpoint known good: step s is good when the loss of step s + 1, computed from
        its weights, was seen finite (s < finite_through). A later checkpoint can hold finite weights that already
        give a NaN loss; last.pt is pointed back at the good one, so resume=auto continues from there."""
        where = "no checkpoint was written yet"
        if self.is_main and self.checkpoint_dir.is_dir():
            good = [path for step, path in step_files(self.checkpoint_dir) if step < self.finite_through]
            if good:
                point_last_at(good[-1])
                where = f"last good checkpoint: {good[-1]}, which last.pt now points to"
            elif step_files(self.checkpoint_dir):
                where = f"no checkpoint from before step {self.finite_through} is kept"
        raise TrainingDiverged(f"{what} by step {self.step} ({where}); lower train.lr, keep train.grad_clip set, "
                               "or try train.precision=fp32")

    # ----------------------------------------------------------------- evaluation
    def evaluate(self, max_examples: int | None, progress: bool = False) -> PuzzleEvalResult:
        ema = self.ema.applied() if self.ema else nullcontext()
        # FSDP keeps the weights it gathered for a forward without backward: drop them around eval, so eval
        # gathers the EMA weights and the next training step the trained ones (a no-op without FSDP).
        distributed.reshard(self.model)
        try:
            with ema:
                pad_to = self.cfg.train.eval_batch_size // self.dist.world_size  # one shape for the compiled model
                return evaluate_puzzles(self.forward, self.eval_loader(max_examples), self.device,
                                        halt_max_steps=self.cfg.arch.halt_max_steps, autocast=self.autocast,
                                        progress=progress, pad_to=pad_to if self.cfg.train.compile else None)
        finally:
            distributed.reshard(self.model)

    def finish(self) -> PuzzleEvalResult:
        """Full test split with the EMA weights; eval/final.json, plots, and a last checkpoint."""
        # Every rank knows what this run saved, so all take part in save()'s gather and barrier or none does. (Not
        # "step_N.pt exists": a file from an earlier attempt that diverged after it is not this run's state.)
        if self.saved_step != self.step:
            self.save()
        result = self.evaluate(max_examples=None, progress=self.is_main)  # every rank: its shard, sums all-reduced
        self.loggers.log(result.metrics(), self.step)
        if not self.is_main:
            self.loggers.finish()
            return result
        eval_dir = self.run_dir / "eval"
        eval_dir.mkdir(parents=True, exist_ok=True)
        (eval_dir / "final.json").write_text(json.dumps({"step": self.step, **result.summary()}, indent=2))
        if self.adapter_on:  # the adapter alone, with the weights just evaluated (EMA when on)
            from athena.adapters import save_adapter

            with self.ema.applied() if self.ema else nullcontext():
                save_adapter(self.model, self.run_dir / "adapter")
            log.info("saved the adapter to %s", self.run_dir / "adapter")
        images = {"eval/accuracy_by_step": plot_accuracy_by_step(
            result.exact_accuracy_by_step, result.halt_step_counts, eval_dir / "accuracy_by_step.png",
            title=f"{self.cfg.data.name}, step {self.step}")}
        curve = plot_training_curve(self.run_dir / "metrics.jsonl", eval_dir / "training_curve.png")
        if curve:
            images["eval/training_curve"] = curve
        self.loggers.log_images(images, self.step)
        self.loggers.finish()
        return result


def differing_keys(saved: dict[str, Any], current: dict[str, Any], sections: tuple[str, ...]) -> list[str]:
    """'section.key' for every key of the given config sections whose value differs between two configs."""
    return [f"{section}.{key}" for section in sections
            for key in sorted(set(saved.get(section) or {}) | set(current.get(section) or {}))
            if (saved.get(section) or {}).get(key) != (current.get(section) or {}).get(key)]


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    section, key = dotted.split(".", 1)
    return (config.get(section) or {}).get(key)
