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
perf_counter on a CPU); peak_mem_gb is torch.cuda.max_memory_allocated over warm-up + timed steps (weights,
optimizer state and activations; null on a CPU). Every method gets a freshly built model with the same seed.

    python bench/adapters.py --out bench/results/adapters.json          # GPU (~2-3 min on one H100)
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


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, warmup: int, steps: int) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(steps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - t0))
        return times

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def reset_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def profile_prefill(model, ids, path: Path) -> None:
    """Kernel table of three unmerged prefills plus the CPU-vs-GPU split: when the host's total exceeds the
    device's, the GPU waits for Python and launches (wall time = CPU time), not for kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.is_cuda else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        for _ in range(3):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        if ids.is_cuda:
            torch.cuda.synchronize()
    sort = "cuda_time_total" if ids.is_cuda else "cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))


def measure(impl: str, method: str, args, config, device, dtype) -> list[dict]:
    timer = Timer(device)
    generator = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator).to(device)
    model = build_base(config, device, dtype)
    total_base = sum(p.numel() for p in model.parameters())
    model, aux_loss = add_method(model, impl, method, args.rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    common = dict(impl=impl, method=method, device=args.device_name, model=args.model_name, rank=args.rank,
                  batch=args.batch, seq=args.seq, dtype=str(dtype).removeprefix("torch."),
                  trainable_params=trainable, total_params=total, base_params=total_base, compiled=args.compile)
    records = []
    # --compile: torch.compile fuses each wrapper's few small kernels, the launch overhead the eager numbers show.
    run = torch.compile(model) if args.compile else model

    # --- train step
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)

    def train_step():
        loss = run(input_ids=ids, labels=ids, use_cache=False).loss
        if aux_loss is not None:
            router = aux_loss(model)
            if router is not None:
                loss = loss + router
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_memory(device)
    times = timer(train_step, args.warmup, args.steps)
    records.append({**common, "mode": "train", "step_ms": statistics.median(times), "peak_mem_gb": peak_memory(device)})
    del optimizer, params
    for p in model.parameters():
        p.grad = None

    # --- prefill, unmerged then merged
    model.eval()

    def time_prefill(mode: str, **extra) -> None:
        forward = torch.compile(model) if args.compile else model  # `model` as bound now (merged or not)

        @torch.inference_mode()
        def prefill():
            forward(input_ids=ids, use_cache=False, logits_to_keep=1)

        reset_memory(device)
        times = timer(prefill, args.warmup, args.steps)
        records.append({**common, "mode": mode, "step_ms": statistics.median(times),
                        "peak_mem_gb": peak_memory(device), **extra})

    time_prefill("infer_unmerged")
    if args.profile:
        profile_prefill(model, ids, Path(args.profile) / f"{impl}_{method}_prefill.txt")
    model, note = merge(model, impl)
    time_prefill("infer_merged", **({"note": note} if note else {}))
    if aux_loss is not None:
        aux_loss(model)  # drop anything accumulated (inference adds nothing, but be tidy)
    del model
    reset_memory(device)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy model on the CPU, a few steps (plumbing check)")
    parser.add_argument("--out", default="bench/results/adapters.json")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=None, help="default 4 (tiny: 2)")
    parser.add_argument("--seq", type=int, default=None, help="default 512 (tiny: 32)")
    parser.add_argument("--steps", type=int, default=None, help="timed repetitions, default 20 (tiny: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repetitions first, default 5 (tiny: 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (warm-up untimed)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also write a kernel table of the unmerged prefill per method to DIR")
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
    records = []
    for impl, method in plan:
        start = time.time()
        rows = measure(impl, method, args, config, device, dtype)
        records += rows
        print(f"{impl:>6} {method:<6} " + "  ".join(
            f"{r['mode']} {r['step_ms']:.1f} ms" + (f" {r['peak_mem_gb']:.2f} GB" if r["peak_mem_gb"] is not None else "")
            for r in rows) + f"  [{time.time() - start:.0f} s]", flush=True)

    base = {r["mode"]: r["step_ms"] for r in records if r["impl"] == "base"}
    peft_train = next((r["step_ms"] for r in records if r["impl"] == "peft" and r["mode"] == "train"), None)
    lora_train = next((r["step_ms"] for r in records if r["impl"] == "athena" and r["method"] == "lora"
                       and r["mode"] == "train"), None)
    for r in records:
        if r["mode"] in base:
            r["vs_base"] = r["step_ms"] / base[r["mode"]] if r["mode"] == "train" else r["step_ms"] / base["infer_unmerged"]
        if r["mode"] == "train" and lora_train and r["impl"] == "athena":
            r["vs_athena_lora_train"] = r["step_ms"] / lora_train
        if r["mode"] == "train" and peft_train and r["impl"] != "base":
            r["vs_peft_lora_train"] = r["step_ms"] / peft_train
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "tiny": args.tiny, "timing": f"median of {args.steps} after {args.warmup} warm-up"}
    try:
        import peft
        import transformers

        meta.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    out.write_text(json.dumps({"meta": meta, "records": records}, indent=2))
    print(f"wrote {out} ({len(records)} records)")
    print("| impl | method | mode | step ms | vs base | peak mem GB |\n|---|---|---|---|---|---|")
    for r in records:
        mem = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.2f}"
        print(f"| {r['impl']} | {r['method']} | {r['mode']} | {r['step_ms']:.1f} | {r.get('vs_base', float('nan')):.2f}x | {mem} |")


if __name__ == "__main__":
    main()
