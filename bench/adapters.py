"""Adapter speed on a Llama-shaped ~1B model (random weights, bf16): Athena's adapters against peft LoRA.

For each implementation/method -- base (no adapter; its "train" row is a full fine-tuning step), peft LoRA,
and Athena lora / ia3 / moe (4 experts, top-2) / poly (LoRA+IA3+experts) / hybrid (LoRA on attention +
bottleneck on the FFN) at the same rank and the same target layers:
  train           one training step: causal-LM forward + loss (+ router loss), backward, AdamW step on the
                  trainable parameters; batch x seq tokens
  infer_unmerged  prefill: a no-grad forward over batch x seq tokens (no KV cache kept, last-token logits)
  infer_merged    the same after merge_and_unload() (LoRA/IA3 folded into the weights; experts and
                  bottlenecks cannot be folded and stay, see the `note` field)
step_ms is the median over --steps timed repetitions after --warmup untimed ones (CUDA events, synchronised;
perf_counter on a CPU). Training steps are timed model by model; the prefills of all models (kept on the GPU)
are timed in interleaved rounds, so drifts of host speed or GPU clocks hit every method alike, after a few
seconds of GPU warm-up. A prefill of 2048 tokens through 112 adapted layers is partly launch-bound in eager
mode, so wall time depends on the host CPU: gpu_kernel_ms (the summed kernel time from the profiler) is what
the GPU itself must do (for training steps too), gpu_vs_base its ratio to the base and gpu_vs_athena_lora_train
the training step's to Athena LoRA's. peak_mem_gb is the CUDA peak of that method alone (weights,
optimizer state and activations; null on a CPU). Every method gets a freshly built model with the same seed.

    python bench/adapters.py --out docs/results/adapters/adapters.json       # GPU (~2-3 min on one H100)
    python bench/adapters.py --compile --compile-mode reduce-overhead --only base:none,athena:lora,athena:moe \
        --out docs/results/adapters/adapters_cudagraphs.json    # compiled + CUDA graphs: no launch overhead
    python bench/adapters.py --compile --compile-mode reduce-overhead --prefill-only --only base:none,peft:lora,athena:lora \
        --out docs/results/adapters/adapters_cudagraphs_prefill.json    # the same for the prefills alone
    python bench/adapters.py --tiny --out /tmp/adapters_tiny.json       # CPU plumbing check, seconds

Needs torch, transformers and peft; not Hydra.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATHENA_METHODS = ("lora", "ia3", "moe", "poly", "hybrid")


def llama_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=256, max_position_embeddings=128)
    return LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048)


def build_base(config, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def add_method(model, impl: str, method: str, rank: int):
    """Put the adapter on `model`; returns (model, adapter_aux_loss or None)."""
    if impl == "base":
        return model, None
    if impl == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS, bias="none")
        # Adapters in the base dtype (bf16), as Athena keeps them: the same arithmetic on both sides.
        return get_peft_model(model, config, autocast_adapter_dtype=False), None
    from athena.adapters import AdapterConfig, adapter_aux_loss, add_adapters

    config = AdapterConfig(method=method, rank=rank, alpha=2.0 * rank, num_experts=4, top_k=2, bottleneck_size=64,
                           target_modules=None if method == "hybrid" else TARGETS)
    return add_adapters(model, config), (adapter_aux_loss if method in ("moe", "poly") else None)


def merge(model, impl: str):
    if impl == "base":
        return model, ""
    if impl == "peft":
        return model.merge_and_unload(), ""
    from athena.adapters import merge_and_unload

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = merge_and_unload(model)
    return model, " ".join(str(w.message) for w in caught)


def time_once(fn, cuda: bool) -> float:
    """Milliseconds of one call: CUDA events around it, then a sync (a CPU: perf_counter)."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - t0)


def warm_up_gpu(device: torch.device, seconds: float = 3.0) -> None:
    """Idle GPUs sit at low clocks; the first method timed would pay for the ramp-up. Burn a few seconds first."""
    if device.type != "cuda":
        return
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    end = time.time() + seconds
    while time.time() < end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def reset_peak(device) -> int:
    """Reset the peak counter; returns the bytes allocated now (the models kept for the prefill rounds)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return allocated(device)


def peak_since(device, before: int, own_bytes: int = 0) -> float | None:
    """This method's peak in GB: the peak above what other kept models held, plus its own resident weights."""
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) - before + own_bytes) / 2**30


def kernel_ms(fn, cuda: bool) -> float | None:
    """GPU time of one call: the summed device time of its kernels (profiler, mean of 3), i.e. what the GPU must
    do whatever the host's launch speed. Wall time above this is the GPU waiting for Python and launches."""
    if not cuda:
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 3 / 1000


def profile_prefill(fn, cuda: bool, path: Path) -> None:
    """Kernel table of three prefills, with the host (CPU) and device totals at the bottom."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            fn()
        if cuda:
            torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=25,
                                              max_name_column_width=60))


def measure_train(impl: str, method: str, args, config, device, dtype, ids) -> tuple:
    """Build the model with the method on it and time its training step (not with --prefill-only: record None);
    returns (model, train record, common)."""
    cuda = device.type == "cuda"
    before = reset_peak(device)
    model = build_base(config, device, dtype)
    total_base = sum(p.numel() for p in model.parameters())
    model, aux_loss = add_method(model, impl, method, args.rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    common = dict(impl=impl, method=method, device=args.device_name, model=args.model_name, rank=args.rank,
                  batch=args.batch, seq=args.seq, dtype=str(dtype).removeprefix("torch."),
                  trainable_params=trainable, total_params=total, base_params=total_base, compiled=args.compile,
                  **({"compile_mode": args.compile_mode} if args.compile else {}))
    if args.prefill_only:
        return model.eval(), None, common
    # --compile: torch.compile fuses each wrapper's few small kernels and removes the Python dispatch overhead;
    # --compile-mode reduce-overhead also replays the kernels as CUDA graphs, removing the launch overhead.
    run = torch.compile(model, mode=args.compile_mode) if args.compile else model
    graphs = args.compile and "reduce-overhead" in args.compile_mode
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)

    def train_step():
        if graphs:  # a new iteration: the last step's graph outputs may be overwritten now
            torch.compiler.cudagraph_mark_step_begin()
        loss = run(input_ids=ids, labels=ids, use_cache=False).loss
        if aux_loss is not None:
            router = aux_loss(model)
            if router is not None:
                loss = loss + router
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        train_step()
    times = [time_once(train_step, cuda) for _ in range(args.steps)]
    record = {**common, "mode": "train", "step_ms": statistics.median(times), "gpu_kernel_ms": kernel_ms(train_step, cuda),
              "peak_mem_gb": peak_since(device, before)}
    del optimizer, params
    for p in model.parameters():
        p.grad = None
    model.eval()
    return model, record, common


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def time_prefills(models: dict, mode: str, args, device, ids, commons: dict, notes: dict) -> list[dict]:
    """Prefill every kept model in interleaved rounds (A B C ... A B C ...), so that drifts of the host or the
    GPU clocks hit every method alike; the median over rounds is each method's step_ms."""
    cuda = device.type == "cuda"
    fns = {}
    for key, model in models.items():
        forward = torch.compile(model, mode=args.compile_mode) if args.compile else model

        def prefill(forward=forward):
            with torch.inference_mode():
                forward(input_ids=ids, use_cache=False, logits_to_keep=1)

        fns[key] = prefill
    peaks = {}
    for key, fn in fns.items():  # warm-up (and compilation) per model, with its own peak memory
        before = reset_peak(device)
        for _ in range(args.warmup):
            fn()
        peaks[key] = peak_since(device, before, model_bytes(models[key]))
    times = {key: [] for key in fns}
    for _ in range(args.steps):
        for key, fn in fns.items():
            times[key].append(time_once(fn, cuda))
    records = []
    for key, fn in fns.items():
        if args.profile and mode == "infer_unmerged":
            profile_prefill(fn, cuda, Path(args.profile) / f"{key[0]}_{key[1]}_prefill.txt")
        records.append({**commons[key], "mode": mode, "step_ms": statistics.median(times[key]),
                        "gpu_kernel_ms": kernel_ms(fn, cuda), "peak_mem_gb": peaks[key],
                        **({"note": notes[key]} if notes.get(key) else {})})
    return records


def add_ratios(records: list[dict]) -> None:
    base = {r["mode"]: r for r in records if r["impl"] == "base"}
    peft_train = next((r["step_ms"] for r in records if r["impl"] == "peft" and r["mode"] == "train"), None)
    lora = next((r for r in records if r["impl"] == "athena" and r["method"] == "lora" and r["mode"] == "train"), {})
    lora_train, lora_gpu = lora.get("step_ms"), lora.get("gpu_kernel_ms")
    for r in records:
        ref = base.get("train" if r["mode"] == "train" else "infer_unmerged")
        if ref:
            r["vs_base"] = r["step_ms"] / ref["step_ms"]
            if r.get("gpu_kernel_ms") and ref.get("gpu_kernel_ms"):
                r["gpu_vs_base"] = r["gpu_kernel_ms"] / ref["gpu_kernel_ms"]
        if r["mode"] == "train" and lora_train and r["impl"] == "athena":
            r["vs_athena_lora_train"] = r["step_ms"] / lora_train
            if r.get("gpu_kernel_ms") and lora_gpu:
                r["gpu_vs_athena_lora_train"] = r["gpu_kernel_ms"] / lora_gpu
        if r["mode"] == "train" and peft_train and r["impl"] != "base":
            r["vs_peft_lora_train"] = r["step_ms"] / peft_train


def write(records: list[dict], args) -> None:
    """(Re)write the results file; called after every phase so a cut-off run keeps what it measured."""
    add_ratios(records)
    meta = {"torch": torch.__version__, "tiny": args.tiny, "compiled": args.compile, "compile_mode": args.compile_mode if args.compile else None,
            "timing": f"median of {args.steps} after {args.warmup} warm-up; prefills interleaved across methods"}
    try:
        import peft
        import transformers

        meta.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "records": records}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy model on the CPU, a few steps (plumbing check)")
    parser.add_argument("--out", default="docs/results/adapters/adapters.json")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=None, help="default 4 (tiny: 2)")
    parser.add_argument("--seq", type=int, default=None, help="default 512 (tiny: 32)")
    parser.add_argument("--steps", type=int, default=None, help="timed repetitions, default 20 (tiny: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repetitions first, default 5 (tiny: 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (warm-up untimed)")
    parser.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                        help="with --compile: torch.compile's mode (reduce-overhead = CUDA graphs)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also write a kernel table of the unmerged prefill per method to DIR")
    parser.add_argument("--prefill-only", action="store_true", help="skip the training steps, time the prefills")
    parser.add_argument("--only", default=None, help="comma list of impl:method, e.g. base:none,peft:lora,athena:moe")
    args = parser.parse_args()
    args.batch = args.batch or (2 if args.tiny else 4)
    args.seq = args.seq or (32 if args.tiny else 512)
    args.steps = args.steps or (3 if args.tiny else 20)
    args.warmup = args.warmup or (1 if args.tiny else 5)

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        args.device_name = torch.cuda.get_device_name(device)
    else:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        args.device_name = f"cpu ({platform.machine()})"
    config = llama_config(args.tiny)
    args.model_name = (f"llama-shaped random, hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
                       f"{config.num_attention_heads}/{config.num_key_value_heads} heads, ffn {config.intermediate_size}, "
                       f"vocab {config.vocab_size}")
    plan = [("base", "none"), ("peft", "lora")] + [("athena", m) for m in ATHENA_METHODS]
    if args.only:
        wanted = {tuple(x.split(":")) for x in args.only.split(",")}
        plan = [p for p in plan if p in wanted]
    generator = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator).to(device)
    warm_up_gpu(device)
    records, models, commons, notes = [], {}, {}, {}
    for impl, method in plan:
        start = time.time()
        model, record, common = measure_train(impl, method, args, config, device, dtype, ids)
        models[(impl, method)], commons[(impl, method)] = model, common
        if record is None:  # --prefill-only
            continue
        records.append(record)
        print(f"{impl:>6} {method:<6} train {record['step_ms']:.1f} ms"
              + (f" {record['peak_mem_gb']:.2f} GB" if record["peak_mem_gb"] is not None else "")
              + f"  [{time.time() - start:.0f} s]", flush=True)
        write(records, args)
    records += time_prefills(models, "infer_unmerged", args, device, ids, commons, notes)
    write(records, args)
    for key in list(models):
        models[key], notes[key] = merge(models[key], key[0])
    records += time_prefills(models, "infer_merged", args, device, ids, commons, notes)
    write(records, args)
    print(f"wrote {args.out} ({len(records)} records)")
    print("| impl | method | mode | step ms | vs base | GPU kernel ms | GPU vs base | peak mem GB |\n"
          "|---|---|---|---|---|---|---|---|")
    order = {"train": 0, "infer_unmerged": 1, "infer_merged": 2}
    for r in sorted(records, key=lambda r: (plan.index((r["impl"], r["method"])), order[r["mode"]])):
        mem = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.2f}"
        gpu = "-" if r.get("gpu_kernel_ms") is None else f"{r['gpu_kernel_ms']:.1f}"
        gpu_ratio = "-" if r.get("gpu_vs_base") is None else f"{r['gpu_vs_base']:.2f}x"
        print(f"| {r['impl']} | {r['method']} | {r['mode']} | {r['step_ms']:.1f} | {r.get('vs_base', float('nan')):.2f}x "
              f"| {gpu} | {gpu_ratio} | {mem} |")


if __name__ == "__main__":
    main()
