"""Multi-process training (`torchrun --nproc_per_node=N pretrain.py ...`): process group, device, grad sync.

Design: the model is NOT wrapped in DistributedDataParallel. After the last backward of a step,
`sync_gradients` sums the gradients over ranks explicitly:
  * dense parameters: ONE flat all-reduce (SUM) per dtype of all their gradients. DDP would average (we need a
    sum: the loss is already divided by the GLOBAL batch size), would need no_sync() around gradient
    accumulation, hooks that cope with the (carry, output) forward, and torch.compile interplay; one flat
    all-reduce after backward has none of those concerns and costs no overlap that matters for a tiny model.
  * the puzzle embedding's SPARSE gradient: NCCL cannot all-reduce sparse tensors, and densifying a table with
    one row per puzzle would be huge, so every rank all-gathers every rank's (row indices, row values) (padded to
    the largest count) and rebuilds one coalesced sparse gradient. All ranks then hold the same sparse gradient,
    so SignSGD makes the same update everywhere and the replicas never drift apart.

Single-process runs (no WORLD_SIZE in the environment, or WORLD_SIZE=1) never touch torch.distributed.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from athena.device import pick_device
from athena.errors import AthenaError

log = logging.getLogger("athena")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank layout from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); one process without them."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(device_name: str) -> tuple[DistInfo, torch.device]:
    """Start the process group when launched by torchrun (nccl on GPUs, gloo on CPU); return (info, device)."""
    info = env_info()
    device = pick_device(device_name, info.local_rank if info.enabled else None)
    if not info.enabled:
        return info, device
    if not dist.is_available():
        raise AthenaError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if not is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # device_id binds the NCCL communicator to this rank's GPU (also what barrier() uses).
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    if not info.is_main:  # one copy of the INFO lines (rank 0's); warnings and errors still come from every rank
        log.setLevel(logging.WARNING)
    log.info("distributed: %d processes (%s), rank 0 on %s", info.world_size, dist.get_backend(), device)
    return info, device


def teardown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """rank `src`'s `obj` on every rank (picklable objects; a no-op in one process)."""
    if not is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, as a list on rank 0 (None elsewhere); [obj] in one process."""
    if not is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on at least one (e.g. a stop signal seen by some ranks)."""
    if not is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@torch.no_grad()
def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every rank (one flat broadcast per dtype)."""
    if not is_initialized():
        return
    # FSDP-sharded (DTensor) parameters are left alone: every rank sharded the same full tensors.
    tensors = [t for t in list(module.parameters()) + list(module.buffers()) if not is_dtensor(t)]
    for group in _by_dtype(tensors).values():
        flat = _flatten_dense_tensors([t.data for t in group])
        dist.broadcast(flat, src=src)
        for t, synced in zip(group, _unflatten_dense_tensors(flat, [t.data for t in group])):
            t.data.copy_(synced)


def _by_dtype(tensors: list[torch.Tensor]) -> dict[torch.dtype, list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return groups


@torch.no_grad()
def sync_gradients(dense: list[torch.nn.Parameter], sparse: list[torch.nn.Parameter]) -> None:
    """SUM gradients over ranks, in place. Call once per optimizer step, after the last backward.

    The loss of each micro-batch is divided by the GLOBAL batch size, so the global gradient is the SUM of the
    ranks' gradients (not the mean DDP would take). Under train.parallel=fsdp only the sparse rows are left to sync."""
    if not is_initialized():
        return
    # FSDP-sharded (DTensor) parameters had their gradients reduce-scattered (summed) by FSDP in backward.
    _sync_dense([p for p in dense if p.requires_grad and not is_dtensor(p)])
    for p in sparse:
        if p.requires_grad:
            _sync_sparse(p)


def _sync_dense(params: list[torch.nn.Parameter]) -> None:
    # One flat buffer per dtype: [all grads..., one has-grad flag per param]. A parameter without a gradient on
    # some rank (unused this step) contributes zeros; it stays None only when it has no gradient on any rank.
    for group in _by_dtype(params).values():
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
        for p, g in zip(group, grads):
            if g.is_sparse:
                raise RuntimeError(f"sparse gradient on a dense parameter of shape {tuple(p.shape)}")
        flags = torch.tensor([float(p.grad is not None) for p in group], dtype=group[0].dtype, device=group[0].device)
        flat = _flatten_dense_tensors(grads + [flags])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        *synced, flags = _unflatten_dense_tensors(flat, grads + [flags])
        for p, g, has in zip(group, synced, flags.tolist()):
            if has == 0:
                p.grad = None
            elif p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)


def _sync_sparse(p: torch.nn.Parameter) -> None:
    if p.grad is not None and not p.grad.is_sparse:  # a dense gradient on the embedding: plain sum
        _sync_dense([p])
        return
    device, rows_dim = p.device, p.shape[1:]
    if p.grad is None:
        indices = torch.zeros(0, dtype=torch.long, device=device)
        values = torch.zeros(0, *rows_dim, dtype=p.dtype, device=device)
    else:
        # Sent uncoalesced (one entry per example): concatenated in rank order they are exactly the entries one
        # process would hold for the global batch (the samplers split it contiguously by rank), so coalesce()
        # sums them in the same order. SignSGD takes sign() of these sums, and a near-zero sum summed in another
        # order can flip sign: a full lr-sized difference, not rounding noise.
        grad = p.grad
        indices, values = grad._indices()[0], grad._values()
    world = dist.get_world_size()
    count = torch.tensor([indices.numel()], dtype=torch.long, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    most = max(counts)
    if most == 0:
        p.grad = None
        return
    # all_gather needs equal shapes: pad every rank's rows to the largest count, then drop the padding.
    pad = most - indices.numel()
    indices = torch.cat([indices, indices.new_zeros(pad)])
    values = torch.cat([values, values.new_zeros(pad, *rows_dim)])
    all_indices = [torch.empty_like(indices) for _ in range(world)]
    all_values = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(all_indices, indices)
    dist.all_gather(all_values, values)
    merged_indices = torch.cat([i[:n] for i, n in zip(all_indices, counts)])
    merged_values = torch.cat([v[:n] for v, n in zip(all_values, counts)])
    p.grad = torch.sparse_coo_tensor(merged_indices[None], merged_values, p.shape, check_invariants=False)


# ----------------------------------------------------------------- FSDP2 (train.parallel=fsdp)
# Under FSDP the dense parameters are DTensors sharded on dim 0 over a 1-D mesh of all ranks; FSDP all-gathers them
# before a block's forward and reduce-scatters their gradients in backward. The puzzle embedding (sparse gradient)
# is left out of sharding: a plain, replicated tensor whose sparse rows sync_gradients still all-gathers. Every
# helper below is a no-op (or the plain call) on a model that was not sharded, so the recipe calls them always.

def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(t: Any) -> bool:
    return isinstance(t, _dtensor_type())


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def shard_model(model: torch.nn.Module, device: torch.device, units: list[torch.nn.Module],
                sparse: list[torch.nn.Parameter]) -> None:
    """FSDP2 in place: each of `units` (athena.models.build.fsdp_units: TRM's reasoning blocks, a Hugging Face model's
    decoder layers), then the root, which takes the remaining dense params (TRM: token embedding, lm_head, q_head).
    The `sparse` parameters (TRM's puzzle embedding, trained with sparse gradients) stay replicated. Gradients are
    SUMMED over ranks (divide factor 1, plain SUM collectives), like sync_gradients does for the replicated path:
    each rank's loss is already divided by the global batch.

    reshard_after_forward=False for the units: the TRM calls `net` H_cycles x (L_cycles + 1) times per forward,
    most under no_grad; resharding after each call would all-gather every block again for every call. Kept
    unsharded, a block is all-gathered once for the whole forward. In backward FSDP's post-backward runs once per
    differentiated call (L_cycles + 1 of them): each reduce-scatters (sums) that call's gradient into the sharded
    gradient and reshards, and the next one gathers again. Parameters (not gradients or optimizer state) are whole
    from forward to backward: fine for models whose weights fit one GPU."""
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns once that the root returns views (the carry's detached states, the logits slice); nothing
    # applies an in-place op to them.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    layers = units
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    ignored = set(sparse)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, ignored_params=ignored or None)
    for module in fsdp_modules(model):
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # SUM with no pre/post scaling (gloo has no PREMUL_SUM)


def reshard(model: torch.nn.Module) -> None:
    """Free the unsharded parameters FSDP keeps after a forward without backward (eval): the next forward then
    all-gathers the current shards (e.g. after the EMA weights were swapped in or out) instead of reusing them."""
    for module in fsdp_modules(model):
        module.reshard()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (no communication), else `t` itself."""
    return t.to_local() if is_dtensor(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: call on every rank), else `t` itself."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` (the same on every rank) laid out like `like`: this rank's shard of it if `like` is a DTensor."""
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)  # local slice, no comms


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict (rank 0 gets it, offloaded to the CPU; other ranks an empty dict under FSDP)."""
    if not fsdp_modules(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every rank passes the same one); FSDP keeps each rank's shard."""
    if not fsdp_modules(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True, strict=True))


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with every DTensor state gathered whole (on the CPU): the same layout a replicated
    run saves, so a checkpoint loads at any world size and in either parallel mode."""
    state = optimizer.state_dict()
    if not any(is_dtensor(v) for s in state["state"].values() for v in s.values()):
        return state
    gathered = {i: {k: full_tensor(v).cpu() if is_dtensor(v) else v for k, v in s.items()}
                for i, s in state["state"].items()}
    return {**state, "state": gathered}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimizer state; tensors of a sharded parameter's shape become that parameter's shard."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(is_dtensor(p) for p in params):
        optimizer.load_state_dict(state)
        return
    ids = [i for group in state["param_groups"] for i in group["params"]]
    by_id = dict(zip(ids, params))
    converted = {}
    for i, s in state["state"].items():
        p = by_id.get(i)
        converted[i] = {k: shard_like(v, p) if p is not None and is_dtensor(p) and torch.is_tensor(v)
                        and v.shape == p.shape else v for k, v in s.items()}
    optimizer.load_state_dict({**state, "state": converted})


@torch.no_grad()
def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients so their global L2 norm is at most `max_norm` (as torch's clip_grad_norm_: by
    max_norm / (norm + 1e-6) when that is below 1); returns the norm (float64, before clipping).

    The norm is summed in float64, whole or sharded: an FSDP run (each rank sums the squares of its shards, then
    one all-reduce) and a replicated run get the same float32 clip factor, where float32 sums in two orders
    differed in the last bits and sent the runs apart (a flipped halting decision changes which samples train)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    local = [local_tensor(g) for g in grads]

    def sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
        return sum((torch.linalg.vector_norm(t, dtype=torch.float64).square() for t in tensors),
                   torch.zeros((), dtype=torch.float64, device=local[0].device))

    total = sum_of_squares([t for g, t in zip(grads, local) if not is_dtensor(g)])
    shards = [t for g, t in zip(grads, local) if is_dtensor(g)]
    if shards:  # the shards' squares summed over ranks give the whole tensors'
        total = total + all_reduce_sum(sum_of_squares(shards))
    norm = total.sqrt()
    if math.isfinite(max_norm):
        factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(local, factor.to(local[0].dtype))
    return norm
