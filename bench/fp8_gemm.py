"""Would FP8 matmuls speed up TRM training? The GEMMs of the channel SwiGLU (the only TRM GEMMs whose dimensions
`torch._scaled_mm` takes: the token mixer has 97-wide ones and the head 11) at the Sudoku recipe's size, in bf16
and in FP8 with per-tensor dynamic scaling, each FP8 GEMM timed with the quantisation of its activation operands
(amax, scale, cast, and the transposed copies the weight gradient needs), compiled so Inductor fuses what it can,
and without it (the bare FP8 GEMM on operands quantised beforehand).

Per linear (x: (M, K) activations, W: (N, K) weight, dy: (M, N) output gradient):
  fwd    y  = x W^T       FP8: x -> e4m3
  dgrad  dx = dy W        FP8: dy -> e5m2
  wgrad  dW = dy^T x      FP8: dy^T, x^T -> e5m2 / e4m3 row-major copies
Weights are quantised once per step in a real run (shared by the step's 21 applications), so not timed here.
The projection multiplies each GEMM's saving by how often one TRM-MLP training step runs it: 21 forward
applications of each of the 2 layers (H_cycles=3 x (L_cycles + 1)), 7 of them differentiated (dgrad, wgrad).

    python bench/fp8_gemm.py                          # one H100: ~1 minute
    python bench/fp8_gemm.py --tiny --out /tmp/f.json  # toy size on a CPU (eager), plumbing and numerics
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.adapters import time_once  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def quantize(t: torch.Tensor, dtype: torch.dtype, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor dynamic scaling: (fp8 tensor, float32 inverse scale), row-major (of t^T when transpose)."""
    amax = t.abs().amax().float().clamp(min=1e-12)
    scale = torch.finfo(dtype).max / amax
    q = (t.float() * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    return (q.t().contiguous() if transpose else q), scale.reciprocal()


def fp8_ops(w: torch.Tensor, quantized_inputs: bool = False):
    """The three FP8 GEMMs of one linear with weight w (N, K), quantisation of the activations included (or, with
    quantized_inputs, the bare GEMMs: the arguments are then the outputs of `quantize`, see gemm_only_args)."""
    w_q, w_inv = quantize(w, E4M3)  # (N, K): as B = w_q.t() it is column-major, as _scaled_mm wants
    wt_q, wt_inv = quantize(w, E4M3, transpose=True)  # (K, N) row-major, for dgrad's B = wt_q.t()
    if quantized_inputs:
        mm = torch._scaled_mm
        return (lambda x_q, x_inv: mm(x_q, w_q.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=torch.bfloat16),
                lambda dy_q, dy_inv: mm(dy_q, wt_q.t(), scale_a=dy_inv, scale_b=wt_inv, out_dtype=torch.bfloat16),
                lambda dyt_q, dy_inv, xt_q, x_inv: mm(dyt_q, xt_q.t(), scale_a=dy_inv, scale_b=x_inv,
                                                      out_dtype=torch.bfloat16))

    def fwd(x):
        x_q, x_inv = quantize(x, E4M3)
        return torch._scaled_mm(x_q, w_q.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=torch.bfloat16)

    def dgrad(dy):
        dy_q, dy_inv = quantize(dy, E5M2)
        return torch._scaled_mm(dy_q, wt_q.t(), scale_a=dy_inv, scale_b=wt_inv, out_dtype=torch.bfloat16)

    def wgrad(dy, x):
        dyt_q, dy_inv = quantize(dy, E5M2, transpose=True)  # (N, M) row-major
        xt_q, x_inv = quantize(x, E4M3, transpose=True)  # (K, M) row-major: as B = xt_q.t(), column-major (M, K)
        return torch._scaled_mm(dyt_q, xt_q.t(), scale_a=dy_inv, scale_b=x_inv, out_dtype=torch.bfloat16)

    return fwd, dgrad, wgrad


def bf16_ops(w: torch.Tensor):
    return (lambda x: x @ w.t()), (lambda dy: dy @ w), (lambda dy, x: dy.t() @ x)


def time_ms(fn, args, steps: int, cuda: bool) -> float:
    """Median milliseconds of fn(*args) over `steps` calls after 3 untimed ones (bench/adapters.py's timer)."""
    for _ in range(3):
        fn(*args)
    return statistics.median(time_once(lambda: fn(*args), cuda) for _ in range(steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy size on the CPU, eager")
    parser.add_argument("--batch", type=int, default=768)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="docs/results/fp8_gemm/fp8_gemm.json")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    tokens, hidden, inner = (64 * 4, 64, 96) if args.tiny else (args.batch * 97, 512, 1536)
    forward_apps, grad_apps = 21, 7  # per layer and training step (TRM-MLP Sudoku: H=3, L=6)
    compile_fn = torch.compile if cuda else (lambda f: f)
    gen = torch.Generator(device="cpu").manual_seed(0)
    records = []
    for name, k, n in (("gate_up", hidden, 2 * inner), ("down", inner, hidden)):
        w = (torch.randn(n, k, generator=gen) * k**-0.5).to(device, torch.bfloat16)
        x = torch.randn(tokens, k, generator=gen).to(device, torch.bfloat16)
        dy = (torch.randn(tokens, n, generator=gen) * 1e-3).to(device, torch.bfloat16)  # gradients are small
        gemm_args = {"fwd": (x,), "dgrad": (dy,), "wgrad": (dy, x)}
        exact = {"fwd": x.float() @ w.float().t(), "dgrad": dy.float() @ w.float(), "wgrad": dy.float().t() @ x.float()}
        gemm_only_args = {"fwd": quantize(x, E4M3), "dgrad": quantize(dy, E5M2),
                          "wgrad": (*quantize(dy, E5M2, transpose=True), *quantize(x, E4M3, transpose=True))}
        for (op, f_bf16), f_fp8, f_gemm in zip(zip(("fwd", "dgrad", "wgrad"), bf16_ops(w)), fp8_ops(w),
                                               fp8_ops(w, quantized_inputs=True)):
            a = gemm_args[op]
            m_, k_, n_ = {"fwd": (tokens, k, n), "dgrad": (tokens, n, k), "wgrad": (n, tokens, k)}[op]
            flop = 2 * m_ * k_ * n_
            bf16_ms = time_ms(compile_fn(f_bf16), a, args.steps, cuda)
            fp8_ms = time_ms(compile_fn(f_fp8), a, args.steps, cuda)
            gemm_ms = time_ms(f_gemm, gemm_only_args[op], args.steps, cuda)
            ref = exact[op]
            err = lambda y: ((y.float() - ref).norm() / ref.norm()).item()  # noqa: E731
            apps = forward_apps if op == "fwd" else grad_apps
            records.append(dict(linear=name, gemm=op, m=m_, k=k_, n=n_, device=(torch.cuda.get_device_name() if cuda
                                else "cpu"), bf16_ms=bf16_ms, fp8_gemm_only_ms=gemm_ms, fp8_with_quant_ms=fp8_ms,
                                bf16_tflops=flop / bf16_ms / 1e9, speedup=bf16_ms / fp8_ms,
                                rel_err_bf16=err(f_bf16(*a)), rel_err_fp8=err(f_fp8(*a)),
                                per_step_calls=2 * apps, step_saving_ms=2 * apps * (bf16_ms - fp8_ms)))
            r = records[-1]
            print(f"{name:>7} {op:<5} bf16 {bf16_ms:7.3f} ms ({r['bf16_tflops']:5.0f} TFLOP/s)  fp8 gemm {gemm_ms:6.3f}  fp8+quant {fp8_ms:7.3f} ms"
                  f"  {r['speedup']:.2f}x  rel.err bf16 {r['rel_err_bf16']:.1e} fp8 {r['rel_err_fp8']:.1e}"
                  f"  x{r['per_step_calls']}/step: {r['step_saving_ms']:+.1f} ms", flush=True)
    total = sum(r["step_saving_ms"] for r in records)
    print(f"projected saving per TRM-MLP training step: {total:+.1f} ms (positive = FP8 faster)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(tokens=tokens, hidden=hidden, inner=inner, records=records,
                                              projected_step_saving_ms=total, torch=torch.__version__), indent=1))


if __name__ == "__main__":
    sys.exit(main())
