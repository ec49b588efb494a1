"""One training step of the two reference TRM implementations, for bench/throughput.py.

The references' code is used for the measurement only and is never part of this repository: each builder
imports it at run time from a directory given as an argument (git-ignored `.ref/official`, `.ref/nano`).

- Official TRM (SamsungSAILMontreal/TinyRecursiveModels): `models/recursive_reasoning/trm.py`
  (`TinyRecursiveReasoningModel_ACTV1`), `models/losses.py` (`ACTLossHead`, stablemax cross-entropy),
  `models/sparse_embedding.py` (`CastedSparseEmbeddingSignSGD_Distributed`). The step reproduces
  `pretrain.py`'s `create_model` + `train_batch` for one process.
- nano-trm (PyPI `nano-trm`, top-level package `src`): `src/nn/models/trm.py` (`TRMModule`, a LightningModule
  with manual optimisation) driven without Lightning's Trainer; the step reproduces its `training_step`.

Each builder returns `(step, module)`: `step()` runs one training step on a fixed synthetic batch already on the
device, with the ACT carry persisting across calls; `step.state["loss"]` holds the last (unscaled, summed) loss
as a device tensor and `step.info` says what was built. Nothing in `step()` syncs with the host unless
`loop_extras=True` asks for the reference's own per-step host work.

Smoke test (toy size, CPU, seconds):
    python bench/references.py --official-dir /path/to/official --nano-dir /path/to/nano
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import types
import warnings
from typing import Callable

import torch

# Both codebases' Sudoku/maze recipes (official README commands; nano-trm experiment configs).
_LR = 1e-4
_PUZZLE_EMB_LR = 1e-4
_WEIGHT_DECAY = 1.0
_BETAS = (0.9, 0.95)
_EXPANSION = 4


# --------------------------------------------------------------------------------------------------------------
# Import plumbing and shims for modules the GPU box may lack. Each shim is installed only when the real module is
# missing (importlib.util.find_spec is None), and is listed in step.info["shims"].
# --------------------------------------------------------------------------------------------------------------

_SHIMMED: set[str] = set()  # top-level names of the stand-ins installed by this module


def _missing(name: str) -> bool:
    if name in _SHIMMED:
        return True
    if name in sys.modules:
        return False
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def _shim_einops(shims: list[str]) -> None:
    """einops: both references call only `einops.rearrange(t, 'B S H D -> B H S D')` and the reverse around
    scaled_dot_product_attention. For a pure permutation einops' torch backend returns `t.permute(...)`, a
    view; this stand-in does exactly that (and refuses any other pattern), so it changes nothing measured."""
    if not _missing("einops"):
        return
    mod = types.ModuleType("einops")

    def rearrange(tensor, pattern: str, **axes_lengths):
        left, right = (side.split() for side in pattern.split("->"))
        if axes_lengths or sorted(left) != sorted(right) or len(set(left)) != len(left) or \
                any(not a.isidentifier() for a in left):
            raise NotImplementedError(f"einops shim: only axis permutations are supported, got {pattern!r}")
        return tensor.permute(*[left.index(a) for a in right])

    mod.rearrange = rearrange
    sys.modules["einops"] = mod
    _SHIMMED.add("einops")
    shims.append("einops (permute-only rearrange)")


def _shim_empty(name: str, shims: list[str], why: str, **attrs) -> None:
    """An empty stand-in for a module that is imported at module level but not used by the training step."""
    if not _missing(name.split(".")[0]) or name in sys.modules:
        return
    parts = name.split(".")
    _SHIMMED.add(parts[0])
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        if sub not in sys.modules:
            mod = types.ModuleType(sub)
            mod.__path__ = []  # a package, so that submodule stand-ins can hang under it
            sys.modules[sub] = mod
            if i > 1:
                setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], mod)
    for key, value in attrs.items():
        setattr(sys.modules[name], key, value)
    shims.append(f"{name} ({why})")


def _mount_package(name: str, path: str) -> None:
    """Make `import name.x` load from `path` whatever else is on sys.path: the official checkout's `models` is a
    namespace package (no __init__.py), which any regular package called `models` on sys.path would shadow, and
    nano-trm's top-level `src` is an equally generic name. The package's own __init__ (empty in both) is not run."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"reference package directory not found: {path}")
    path = os.path.realpath(path)
    old = sys.modules.get(name)
    if old is not None and [os.path.realpath(p) for p in getattr(old, "__path__", [])] == [path]:
        return
    if old is not None:
        warnings.warn(f"replacing already-imported module {name!r} ({getattr(old, '__path__', old)}) by {path}")
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    pkg = types.ModuleType(name)
    pkg.__path__ = [path]
    pkg.__file__ = os.path.join(path, "__init__.py")
    sys.modules[name] = pkg


def _adamw(params, device: torch.device, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Stand-in for the CUDA-only `adam_atan2.AdamATan2` that both codebases use (nano-trm falls back to plain
    AdamW itself when adam_atan2 is missing): AdamW, fused on CUDA, foreach elsewhere. Same betas/weight decay;
    AdamW's eps=1e-8 in place of atan2's scale-free update. This is what the published reference numbers used."""
    cuda = device.type == "cuda"
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=_BETAS,
                             fused=cuda, foreach=None if cuda else True)


def _check_variant(variant: str) -> None:
    if variant not in ("att", "mlp"):
        raise ValueError(f"variant must be 'att' or 'mlp', got {variant!r}")


# --------------------------------------------------------------------------------------------------------------
# Official TRM
# --------------------------------------------------------------------------------------------------------------


def _random_batch(names: tuple[str, str], dtype: torch.dtype, vocab_size: int, seq_len: int, batch_size: int,
                  num_puzzle_identifiers: int, seed: int, dev) -> dict[str, torch.Tensor]:
    """Random (input, label) tokens in [1, vocab) and puzzle ids, under each codebase's own key names and dtype."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens = {name: torch.randint(1, vocab_size, (batch_size, seq_len), generator=gen, dtype=dtype) for name in names}
    ids = torch.randint(0, num_puzzle_identifiers, (batch_size,), generator=gen, dtype=dtype)
    return {k: v.to(dev) for k, v in {**tokens, "puzzle_identifiers": ids}.items()}

def build_official_step(ref_dir: str, variant: str, seq_len: int, vocab_size: int, batch_size: int,
                        num_puzzle_identifiers: int, device: str, compile: bool, bf16: bool = True,
                        hidden_size: int = 512, num_heads: int = 8, H_cycles: int = 3, L_cycles: int = 6,
                        puzzle_emb_len: int = 16, halt_max_steps: int = 16, *, L_layers: int = 2,
                        ema: bool = False, loop_extras: bool = False, seed: int = 0,
                        halt_exploration_prob: float = 0.1,
                        ) -> tuple[Callable[[], None], torch.nn.Module]:
    """One `pretrain.py` training step of the official TRM (world size 1).

    Model: `TinyRecursiveReasoningModel_ACTV1` with `config/arch/trm.yaml` (L_layers 2, expansion 4, puzzle
    embedding of `hidden_size` dims spread over `puzzle_emb_len` positions, so the sequence is
    puzzle_emb_len + seq_len long, halt exploration 0.1 unless given, no ACT-continue loss), `mlp_t=True` and
    `pos_encodings=none` for the MLP variant as in the README's Sudoku command, RoPE for attention; wrapped in
    `ACTLossHead(loss_type="stablemax_cross_entropy")`, built under `torch.device(device)` (pretrain.py: "cuda")
    and, if `compile`, `torch.compile(model)` as pretrain.py does. Precision: `forward_dtype="bfloat16"` (fp32
    parameters cast per matmul, bf16 activations and carry, no autocast), or "float32" when `bf16=False`.
    Optimisers in pretrain.py's order: `CastedSparseEmbeddingSignSGD_Distributed(world_size=1)` on the puzzle
    embedding's buffers (no process group needed at world size 1: it only all-gathers when world_size > 1), then
    AdamW (see `_adamw`) on all parameters. LRs are the README Sudoku values after warm-up (lr_min_ratio 1.0 makes
    the schedule constant there). Step: forward through the carry, `((1 / batch) * loss).backward()`, for each
    optimiser set lr, step, zero_grad.
    `loop_extras=True` adds train_batch's metric reduction to the host (`torch.stack(...).cpu().numpy()`, a sync
    every step); `ema=True` adds the recipe's `EMAHelper(0.999).update` after each step (README: ema=True)."""
    _check_variant(variant)
    dev = torch.device(device)
    shims: list[str] = []
    _shim_einops(shims)  # models/layers.py imports einops; pydantic (trm.py) is required, not shimmed
    _mount_package("models", os.path.join(ref_dir, "models"))
    trm = importlib.import_module("models.recursive_reasoning.trm")
    losses = importlib.import_module("models.losses")
    sparse = importlib.import_module("models.sparse_embedding")

    torch.manual_seed(seed)
    arch = dict(
        # config/arch/trm.yaml
        H_cycles=H_cycles, L_cycles=L_cycles, H_layers=0, L_layers=L_layers, hidden_size=hidden_size,
        num_heads=num_heads, expansion=_EXPANSION, puzzle_emb_ndim=hidden_size,
        pos_encodings="none" if variant == "mlp" else "rope",
        forward_dtype="bfloat16" if bf16 else "float32",
        mlp_t=variant == "mlp", puzzle_emb_len=puzzle_emb_len, no_ACT_continue=True,
        halt_exploration_prob=halt_exploration_prob, halt_max_steps=halt_max_steps,
        # create_model's additions
        batch_size=batch_size, vocab_size=vocab_size, seq_len=seq_len,
        num_puzzle_identifiers=num_puzzle_identifiers, causal=False,
    )
    with torch.device(dev):
        model = trm.TinyRecursiveReasoningModel_ACTV1(arch)
        model = losses.ACTLossHead(model, loss_type="stablemax_cross_entropy")
        if compile:
            model = torch.compile(model)
    model.train()
    optimizers = [
        sparse.CastedSparseEmbeddingSignSGD_Distributed(model.model.puzzle_emb.buffers(), lr=0,
                                                        weight_decay=_WEIGHT_DECAY, world_size=1),
        _adamw(model.parameters(), dev, lr=0, weight_decay=_WEIGHT_DECAY),
    ]
    optimizer_lrs = [_PUZZLE_EMB_LR, _LR]

    # Synthetic batch shaped like the official dataset's (int32; puzzle id 0 is its "<blank>").
    batch = _random_batch(("inputs", "labels"), torch.int32, vocab_size, seq_len, batch_size,
                          num_puzzle_identifiers, seed, dev)
    with torch.device(dev):  # as train_batch does for the first batch
        carry = model.initial_carry(batch)

    ema_helper = None
    if ema:
        ema_helper = importlib.import_module("models.ema").EMAHelper(mu=0.999)
        ema_helper.register(model)

    state: dict = {"carry": carry, "loss": None, "metrics": None}

    def step() -> None:
        state["carry"], loss, metrics, _, _ = model(carry=state["carry"], batch=batch, return_keys=[])
        ((1 / batch_size) * loss).backward()
        for optim, base_lr in zip(optimizers, optimizer_lrs):
            for param_group in optim.param_groups:
                param_group["lr"] = base_lr
            optim.step()
            optim.zero_grad()
        if loop_extras:
            keys = sorted(metrics.keys())
            state["metrics"] = dict(zip(keys, torch.stack([metrics[k] for k in keys]).cpu().numpy()))
        if ema_helper is not None:
            ema_helper.update(model)
        state["loss"] = loss.detach()

    step.state = state  # type: ignore[attr-defined]
    step.info = dict(impl="official", variant=variant, compiled=compile,  # type: ignore[attr-defined]
                     compile_mode="default" if compile else None, shims=shims,
                     dtype="forward_dtype=bfloat16, fp32 params" if bf16 else "float32",
                     optimizers=[type(o).__name__ for o in optimizers],
                     seq_total=seq_len + model.model.inner.puzzle_emb_len,
                     params=sum(p.numel() for p in model.parameters()),
                     ema=ema, loop_extras=loop_extras)
    return step, model


# --------------------------------------------------------------------------------------------------------------
# nano-trm
# --------------------------------------------------------------------------------------------------------------

def build_nano_trm_step(ref_dir: str, variant: str, seq_len: int, vocab_size: int, batch_size: int,
                        num_puzzle_identifiers: int, device: str, compile: bool, bf16: bool = True,
                        hidden_size: int = 512, num_heads: int = 8, H_cycles: int = 3, L_cycles: int = 6,
                        puzzle_emb_len: int = 16, halt_max_steps: int = 16, *, L_layers: int = 2,
                        ema: bool = False, loop_extras: bool = False, seed: int = 0,
                        ) -> tuple[Callable[[], None], torch.nn.Module]:
    """One nano-trm `TRMModule.training_step`, without Lightning's Trainer.

    Model: `src.nn.models.trm.TRMModule` with its experiment-config values (num_layers 2, ffn_expansion 4,
    halt exploration 0.1, N_supervision = halt_max_steps, lr 1e-4, weight decay 1.0, warm-up 2000); attention
    variant with 1-D RoPE (`pos_emb_type="1d"`, as its maze recipe), MLP variant `use_mlp_t=True` with no RoPE
    (as its Sudoku recipe). Puzzle embedding `puzzle_emb_dim=hidden_size` over `puzzle_emb_len` positions to match
    the official size (nano's own Sudoku recipe uses none: pass puzzle_emb_len=0 for that). Moved to the device,
    then the optimisers exactly as its `configure_optimizers` builds them (main optimiser first; the puzzle
    embedding's `local_weights` re-made a leaf after the move; `CastedSparseEmbeddingSignSGD_Distributed`
    world_size=1), AdamW (see `_adamw`) in place of AdamATan2.
    Precision: the GPU trainer config's `precision: bf16-mixed` = `torch.autocast(device, bfloat16)` around the
    whole training_step (Lightning's MixedPrecision.train_step_context), on top of the module's own
    `forward_dtype=torch.bfloat16` (what it picks on CUDA); fp32 parameters. `bf16=False`: float32, no autocast.
    compile: as its `setup("fit")`: `inner_forward = torch.compile(inner_forward, mode="reduce-overhead",
    fullgraph=False)` (CUDA graphs; the outer ACT wrapper and loss stay eager).
    Step (default): `training_step` minus its logging: forward + loss (`compute_loss_and_metrics`),
    `(loss / batch).backward()`, `clip_grad_norm_(max_norm=1.0)`, per optimiser: lr (warm-up schedule, then
    constant), step, zero_grad. `loop_extras=True` calls `TRMModule.training_step` itself, which adds its host
    syncs (NaN assert, `metrics["count"] > 0`, grad-norm `.item()`s every 50 steps; `self.log` is a no-op warning
    without a Trainer). `ema=True` adds its EMACallback(0.999) update after each step."""
    _check_variant(variant)
    dev = torch.device(device)
    shims: list[str] = []
    if _missing("lightning"):
        raise ModuleNotFoundError("nano-trm's TRMModule is a LightningModule: `pip install lightning`")
    # Import Lightning before any stand-in exists: it probes optional packages (rich, omegaconf) itself.
    importlib.import_module("lightning.pytorch")
    _shim_einops(shims)  # modules/trm_block.py
    # models/trm.py does `from sklearn import metrics` (unused); src/nn/utils/__init__ imports rich and hydra
    # (rich_utils, instantiators) for its CLI helpers only, never called here.
    _shim_empty("sklearn.metrics", shims, "imported, unused by TRMModule")
    _shim_empty("rich.syntax", shims, "imported by src.nn.utils, unused here")
    _shim_empty("rich.tree", shims, "imported by src.nn.utils, unused here")
    _shim_empty("rich.prompt", shims, "imported by src.nn.utils, unused here", Prompt=object)
    _shim_empty("hydra.core.hydra_config", shims, "imported by src.nn.utils, unused here", HydraConfig=object)
    _shim_empty("omegaconf", shims, "imported by src.nn.utils, unused here", DictConfig=dict, OmegaConf=object,
                open_dict=None)
    _mount_package("src", os.path.join(ref_dir, "src"))
    nano = importlib.import_module("src.nn.models.trm")
    nano_utils = importlib.import_module("src.nn.modules.utils")
    sparse = importlib.import_module("src.nn.modules.sparse_embeddings")

    torch.manual_seed(seed)
    fdtype = torch.bfloat16 if bf16 else torch.float32
    use_puzzle_emb = puzzle_emb_len > 0
    module = nano.TRMModule(
        hidden_size=hidden_size, num_layers=L_layers, num_heads=num_heads,
        max_grid_size=max(1, math.isqrt(seq_len)), H_cycles=H_cycles, L_cycles=L_cycles,
        N_supervision=halt_max_steps, N_supervision_val=halt_max_steps, ffn_expansion=_EXPANSION,
        learning_rate=_LR, learning_rate_emb=_PUZZLE_EMB_LR, weight_decay=_WEIGHT_DECAY, warmup_steps=2000,
        halt_exploration_prob=0.1, puzzle_emb_dim=hidden_size if use_puzzle_emb else 0,
        puzzle_emb_len=puzzle_emb_len if use_puzzle_emb else 0, rope_theta=10000,
        pos_emb_type=None if variant == "mlp" else "1d", use_mlp_t=variant == "mlp",
        lr_min_ratio=1.0, use_muon=False, vocab_size=vocab_size, num_puzzles=num_puzzle_identifiers,
        batch_size=batch_size, pad_value=0, seq_len=seq_len, forward_dtype=fdtype,
    )
    module.to(dev)
    module.train()
    module.total_steps = 10**9  # setup("fit") derives it from the datamodule; only the warm-up uses it

    # configure_optimizers (use_muon=False), with AdamW for AdamATan2.
    optimizers = [_adamw(module.parameters(), dev, lr=_LR, weight_decay=_WEIGHT_DECAY)]
    if module.puzzle_emb is not None:
        module.puzzle_emb.local_weights = module.puzzle_emb.local_weights.detach().requires_grad_(True)
        optimizers.append(sparse.CastedSparseEmbeddingSignSGD_Distributed(
            module.puzzle_emb.buffers(), lr=_PUZZLE_EMB_LR, weight_decay=_WEIGHT_DECAY, world_size=1))
    module._optimizers = optimizers  # training_step's "testing without trainer" path reads this
    base_lrs = [_LR, _PUZZLE_EMB_LR][:len(optimizers)]

    if compile:
        module.inner_forward = torch.compile(module.inner_forward, mode="reduce-overhead", fullgraph=False)

    # Synthetic batch shaped like its datamodules' (int64 after collate; Sudoku puzzle id 0).
    batch = _random_batch(("input", "output"), torch.long, vocab_size, seq_len, batch_size,
                          num_puzzle_identifiers, seed, dev)
    module.carry = module.initial_carry(batch)  # training_step does this on its first batch

    shadow = None
    if ema:  # EMACallback._register + on_train_batch_end
        shadow = {n: p.data.clone().detach() for n, p in module.named_parameters() if p.requires_grad}

    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    state: dict = {"loss": None, "batch_idx": 0}
    params = list(module.parameters())

    def core_step() -> torch.Tensor:
        module.carry, loss, _metrics, _ = module.compute_loss_and_metrics(module.carry, batch)
        (loss / batch_size).backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        for opt, base_lr in zip(optimizers, base_lrs):
            if module.manual_step < module.hparams.warmup_steps:
                lr = nano_utils.compute_lr(base_lr=base_lr, lr_warmup_steps=module.hparams.warmup_steps,
                                           lr_min_ratio=module.hparams.lr_min_ratio,
                                           current_step=module.manual_step, total_steps=module.total_steps)
            else:
                lr = base_lr
            for param_group in opt.param_groups:
                param_group["lr"] = lr
            opt.step()
            opt.zero_grad()
        module.manual_step += 1
        return loss

    def step() -> None:
        with autocast:
            if loop_extras:
                loss = module.training_step(batch, state["batch_idx"])
            else:
                loss = core_step()
        state["batch_idx"] += 1
        if shadow is not None:
            with torch.no_grad():
                for name, p in module.named_parameters():
                    if p.requires_grad and name in shadow:
                        shadow[name].mul_(0.999).add_(p.data, alpha=1.0 - 0.999)
        state["loss"] = loss.detach()

    step.state = state  # type: ignore[attr-defined]
    step.info = dict(impl="nano-trm", variant=variant, compiled=compile,  # type: ignore[attr-defined]
                     compile_mode="reduce-overhead (inner_forward only)" if compile else None, shims=shims,
                     dtype="bf16-mixed autocast + forward_dtype=bfloat16, fp32 params" if bf16 else "float32",
                     optimizers=[type(o).__name__ for o in optimizers],
                     seq_total=seq_len + module.puzzle_emb_len,
                     params=sum(p.numel() for p in module.parameters()),
                     ema=ema, loop_extras=loop_extras)
    return step, module


# --------------------------------------------------------------------------------------------------------------

def _smoke(official_dir: str | None, nano_dir: str | None, steps: int = 3) -> None:
    toy = dict(seq_len=16, vocab_size=11, batch_size=4, num_puzzle_identifiers=2, device="cpu", compile=False,
               bf16=False, hidden_size=64, num_heads=2, H_cycles=2, L_cycles=2, puzzle_emb_len=16,
               halt_max_steps=2)  # 2 supervision steps, so the 3 steps also exercise the carry reset
    builders = [("official", build_official_step, official_dir), ("nano-trm", build_nano_trm_step, nano_dir)]
    for name, builder, ref_dir in builders:
        if ref_dir is None:
            continue
        for variant in ("att", "mlp"):
            step, _ = builder(ref_dir, variant, **toy)
            losses = []
            for _ in range(steps):
                step()
                losses.append(step.state["loss"].item() / toy["batch_size"])
            info = step.info
            print(f"[{name} {variant}] params={info['params']:,} seq={info['seq_total']} "
                  f"opts={info['optimizers']} shims={info['shims'] or 'none'} "
                  f"loss/sample: {', '.join(f'{v:.4f}' for v in losses)}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-dir", default=".ref/official")
    parser.add_argument("--nano-dir", default=".ref/nano")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    _smoke(args.official_dir, args.nano_dir, args.steps)
