"""Can one GEMM kernel add LoRA for free? Unmerged LoRA costs a prefill ~1.4x the base (docs/benchmarks.md): besides
the small x A^T, its up-projection adds an output-sized tensor to the base output. This probe times, per linear of
the 1B Llama prefill (2048 tokens), in bf16 on one GPU:
  cublas_base      x W^T (what the base model runs)
  cublas_lora      x W^T, then x A^T, then addmm_ of s (x A^T) B^T into it (Athena's eager LoRA, 3 kernels)
  triton_base      the same x W^T as a Triton GEMM (how close Triton gets to cuBLAS on this shape)
  triton_lora      x A^T (cuBLAS), then ONE Triton GEMM adding s (x A^T) B^T in its epilogue
Autotuned over a few tile shapes; timed inside CUDA graphs (GPU time, no launch cost). Needs a CUDA GPU and Triton.

    python bench/lora_gemm_probe.py --out docs/results/adapters/lora_gemm_probe.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import triton
import triton.language as tl

CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
           for bm, bn, bk, s, w in [(128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (256, 128, 64, 3, 8),
                                    (128, 128, 64, 5, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)]]


@triton.autotune(configs=CONFIGS, key=["M", "N", "K", "HAS_LORA"])
@triton.jit
def _gemm(x_ptr, w_ptr, xa_ptr, b_ptr, y_ptr, M, N, K, scale,
          HAS_LORA: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          GROUP_M: tl.constexpr):
    """y (M, N) = x (M, K) @ w (N, K)^T [+ scale * xa (M, R) @ b (N, R)^T]; all row-major, K % BK == 0."""
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP_M * grid_n)  # grouped order: neighbouring programs share x tiles in L2
    first_m = group * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    x_tile = x_ptr + rm[:, None] * K + rk[None, :]
    w_tile = w_ptr + rn[None, :] * K + rk[:, None]  # (BK, BN) view of w^T
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K, BK):
        x = tl.load(x_tile, mask=rm[:, None] < M, other=0.0)
        w = tl.load(w_tile, mask=rn[None, :] < N, other=0.0)
        acc = tl.dot(x, w, acc)
        x_tile += BK
        w_tile += BK
    if HAS_LORA:  # epilogue: + scale * xa_tile (BM, R) @ b_tile^T (R, BN), a tiny MMA, no output-sized pass
        rr = tl.arange(0, R)
        xa = tl.load(xa_ptr + rm[:, None] * R + rr[None, :], mask=rm[:, None] < M, other=0.0)
        b = tl.load(b_ptr + rn[None, :] * R + rr[:, None], mask=rn[None, :] < N, other=0.0)
        acc += scale * tl.dot(xa, b)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def triton_linear(x, w, xa=None, b=None, scale=1.0):
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    R = xa.shape[1] if xa is not None else 16
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
    _gemm[grid](x, w, xa if xa is not None else x, b if b is not None else w, y, M, N, K, scale,
                HAS_LORA=xa is not None, R=R)
    return y


def time_ms(fn, steps=20, per_graph=10) -> float:
    """GPU time of one call: `per_graph` calls captured in a CUDA graph (no host launch cost, which for Triton's
    launcher is as long as these kernels), median over `steps` replays, divided by `per_graph`."""
    for _ in range(3):  # autotune and warm up outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / per_graph)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (tl.dot needs >= 16)")
    parser.add_argument("--out", default="docs/results/adapters/lora_gemm_probe.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev, dt, M, R, s = "cuda", torch.bfloat16, args.tokens, args.rank, 2.0
    # (name, in, out, count per prefill): the 1B Llama of bench/adapters.py, 16 layers
    linears = [("q/o", 2048, 2048, 32), ("k/v", 2048, 512, 32), ("gate/up", 2048, 5632, 32), ("down", 5632, 2048, 16)]
    records = []
    for name, K, N, count in linears:
        x = torch.randn(M, K, device=dev, dtype=dt)
        w = torch.randn(N, K, device=dev, dtype=dt) * K**-0.5
        a = torch.randn(R, K, device=dev, dtype=dt) * K**-0.5
        b = torch.randn(N, R, device=dev, dtype=dt) * 0.1
        xa = x @ a.t()
        ref = (x.float() @ w.float().t()) + s * (xa.float() @ b.float().t())
        fused = triton_linear(x, w, xa, b, s)
        err = ((fused.float() - ref).norm() / ref.norm()).item()

        def cublas_lora():
            out = x @ w.t()
            out.addmm_(x @ a.t(), b.t(), alpha=s)
            return out

        t = dict(cublas_base=time_ms(lambda: x @ w.t()), cublas_lora=time_ms(cublas_lora),
                 triton_base=time_ms(lambda: triton_linear(x, w)),
                 triton_lora=time_ms(lambda: triton_linear(x, w, x @ a.t(), b, s)))
        records.append(dict(linear=name, m=M, k=K, n=N, rank=R, count=count, device=torch.cuda.get_device_name(),
                            rel_err_triton_lora=err, **{f"{k}_us": v * 1e3 for k, v in t.items()}))
        print(f"{name:>8} {M}x{K}x{N}: " + "  ".join(f"{k} {v * 1e3:6.1f} us" for k, v in t.items())
              + f"  rel.err {err:.1e}", flush=True)
    totals = {k: sum(r[f"{k}_us"] * r["count"] for r in records) / 1e3 for k in
              ("cublas_base", "cublas_lora", "triton_base", "triton_lora")}
    print("per prefill (ms): " + "  ".join(f"{k} {v:.2f}" for k, v in totals.items())
          + f"  | lora overhead: cuBLAS {totals['cublas_lora'] - totals['cublas_base']:+.2f} ms,"
          f" fused Triton {totals['triton_lora'] - totals['cublas_base']:+.2f} ms")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(records=records, per_prefill_ms=totals, torch=torch.__version__,
                                              triton=triton.__version__), indent=1))


if __name__ == "__main__":
    main()
