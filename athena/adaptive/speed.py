"""How much faster adaptive computation can be, and the capacity that reaches a target speedup.

flop_ceiling: forward FLOPs of a dense Llama-layout model over those of the adaptive one, from shapes alone (the
LM head counted: on SmolLM2 its 49k vocabulary is a large share of each token's FLOPs). What the adaptive forward
must still do for a token: all of every layer until it exits; after that only the key/value projections of later
layers (its K/V serve later tokens, see wrapper.py). The FFN runs on `capacity` of the active tokens; the router and
gate dot products are counted. Attention scores are counted for the active queries only (the ceiling of a varlen
kernel; wrapper.py's dense query block still computes them for exited tokens).

live_tensor_bytes: bytes of live tensors (cyclic garbage included), for leak checks in benchmarks and tests.

search_capacity_for_speedup: binary search over capacity for a target speedup, given any time(capacity) function
(measured wall-clock in infer.py; a synthetic monotone one in tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Shapes:
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def of(cls, config) -> Shapes:
        return cls(hidden=config.hidden_size, ffn=config.intermediate_size, layers=config.num_hidden_layers,
                   heads=config.num_attention_heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   vocab=config.vocab_size)


def token_flops(s: Shapes, context: float, capacity: float = 1.0, exit_after: int | None = None) -> float:
    """Forward FLOPs of one token that attends to `context` keys and exits after layer `exit_after` (None: never)."""
    head_dim = s.hidden // s.heads
    kv = 2 * 2 * s.hidden * s.kv_heads * head_dim           # k and v projections
    q_o = 2 * 2 * s.hidden * s.hidden                        # q and o projections
    scores = 2 * 2 * s.heads * head_dim * context            # q.k and p.v
    ffn = 2 * 3 * s.hidden * s.ffn                           # SwiGLU: gate, up, down
    overhead = 2 * s.hidden if capacity < 1 else 0           # the router's dot product
    active_layers = s.layers if exit_after is None else exit_after
    total = active_layers * (kv + q_o + scores + capacity * ffn + overhead)
    total += (s.layers - active_layers) * kv                 # K/V from the exit state for later tokens
    return total + 2 * s.hidden * s.vocab                    # LM head


def flop_ceiling(shapes: Shapes, seq_len: int, capacity: float, exit_profile: dict[int, float] | None = None) -> float:
    """dense FLOPs / adaptive FLOPs for a causal prefill of seq_len tokens (mean context (seq_len + 1) / 2).
    exit_profile: {layer: share of all tokens leaving after it}; the rest run every layer."""
    context = (seq_len + 1) / 2
    dense = token_flops(shapes, context)
    profile = exit_profile or {}
    stay = 1.0 - sum(profile.values())
    adaptive = stay * token_flops(shapes, context, capacity)
    adaptive += sum(share * token_flops(shapes, context, capacity, layer) for layer, share in profile.items())
    return dense / adaptive


@dataclass
class SpeedupSearch:
    capacity: float
    speedup: float
    reached: bool
    trace: list[tuple[float, float]] = field(default_factory=list)  # (capacity, speedup) per measurement


def search_capacity_for_speedup(target: float, time_at: Callable[[float], float], low: float = 0.1,
                                high: float = 1.0, tolerance: float = 0.01, max_steps: int = 12) -> SpeedupSearch:
    """The largest capacity in [low, high] whose speedup time_at(1.0) / time_at(c) reaches `target` (speedup falls
    as capacity rises), by bisection to `tolerance`. Not reachable even at `low`: low, reached=False."""
    if target <= 0:
        raise ValueError(f"target speedup must be > 0, got {target}")
    dense = time_at(1.0)
    trace = []

    def speedup(c: float) -> float:
        value = dense / time_at(c)
        trace.append((c, value))
        return value

    at_low = speedup(low)
    if at_low < target:
        return SpeedupSearch(low, at_low, False, trace)
    good, good_speedup, bad = low, at_low, high
    at_high = speedup(high)
    if at_high >= target:
        return SpeedupSearch(high, at_high, True, trace)
    for _ in range(max_steps):
        if bad - good <= tolerance:
            break
        middle = (good + bad) / 2
        value = speedup(middle)
        if value >= target:
            good, good_speedup = middle, value
        else:
            bad = middle
    return SpeedupSearch(good, good_speedup, True, trace)


def measure_seconds(run: Callable[[], object], device, repeats: int = 5, warmup: int = 2) -> float:
    """Median wall-clock seconds of run(): CUDA events on a GPU (no host timing of queued kernels), perf_counter
    on a CPU."""
    import statistics
    import time

    import torch

    for _ in range(warmup):
        run()
    times = []
    cuda = torch.device(device).type == "cuda"
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            began = time.perf_counter()
            run()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def live_tensor_bytes(device=None) -> int:
    """Bytes of the tensor storages the garbage collector tracks (each storage once; views share theirs), on
    `device` (a type such as "cuda", or None for all). Counted without collecting first, so tensors held only by
    reference cycles count: what a leak check wants, since a forward's balanced allocations rarely trigger the
    full collection that would free them."""
    import gc

    import torch

    kind = None if device is None else torch.device(device).type
    seen: dict[tuple[str, int], int] = {}
    for obj in gc.get_objects():
        # type(), not isinstance: isinstance reads __class__, which some deprecated module proxies warn on
        if not issubclass(type(obj), torch.Tensor) or obj.is_meta or (kind is not None and obj.device.type != kind):
            continue
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            continue
        seen[(obj.device.type, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())
