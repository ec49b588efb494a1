"""Why freezing must be a prefix: the training-step time of a random Llama with k of its layers frozen as a prefix
(the embedding and the first k-1 decoder layers, as ProgressiveFreezingScheduler freezes) against the same number of
layers frozen at the output end (the last k decoder layers), against nothing frozen.

    python bench/freezing_prefix.py --out docs/results/freezing            # CPU here; on a GPU with --size large
    python bench/freezing_prefix.py --out /tmp/fp --size tiny --steps 1 --rounds 1   # what the test runs

A frozen prefix builds no autograd graph: its backward is skipped whole. Frozen layers after a trained one still
pass gradients back (activation gradients), and only their weight gradients are skipped. Writes
freezing_prefix.json: per configuration the median step time (forward + backward + AdamW) over --rounds x --steps
timed steps after 2 warm-up steps (the rounds interleave the configurations), and the parameters that train.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from athena.models.hf import causal_lm  # noqa: E402

SIZES = {  # hidden, layers, heads, ffn, vocab, batch, seq
    "tiny": (32, 4, 4, 64, 128, 2, 16),
    "small": (256, 8, 8, 1024, 4096, 8, 128),  # a CPU measures this in minutes
    "large": (1024, 16, 16, 4096, 32000, 8, 1024),  # a GPU
}


def model_and_batch(size: str, device: torch.device):
    hidden, layers, heads, ffn, vocab, batch, seq = SIZES[size]
    torch.manual_seed(0)
    model = causal_lm(vocab, seq, 1, hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=ffn,
                      tie_embeddings=False).to(device)
    tokens = torch.randint(0, vocab, (batch, seq), device=device)
    return model, tokens


def frozen_modules(model, where: str, k: int) -> list[nn.Module]:
    layers = list(model.model.layers)
    if where == "prefix":  # the embedding counts as the first layer
        return [model.get_input_embeddings(), *layers[: k - 1]] if k else []
    return layers[len(layers) - k:] if k else []


class Config:
    """One model with k layers frozen `where`, its optimizer and batch, timed a few steps at a time."""

    def __init__(self, size: str, where: str, k: int, device: torch.device):
        self.where, self.k, self.device = where, k, device
        self.model, self.tokens = model_and_batch(size, device)
        for module in frozen_modules(self.model, where, k):
            module.requires_grad_(False)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4)
        self.times: list[float] = []

    def steps(self, n: int, record: bool = True) -> None:
        for _ in range(n):
            sync(self.device)
            start = time.perf_counter()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                logits = self.model(input_ids=self.tokens).logits
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), self.tokens[:, 1:].flatten())
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            sync(self.device)
            if record:
                self.times.append(time.perf_counter() - start)

    def record(self) -> dict:
        return {"frozen": self.where if self.k else "none", "layers_frozen": self.k,
                "step_ms": 1000 * statistics.median(self.times), "timed_steps": len(self.times),
                "trainable_params": sum(p.numel() for p in self.trainable),
                "total_params": sum(p.numel() for p in self.model.parameters())}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="small on a CPU, large on a GPU")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds over all configurations (median of all steps)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or ("large" if device.type == "cuda" else "small")
    layers = SIZES[size][1]
    configs = [("prefix", 0)] + [(where, k) for k in (layers // 2, layers) for where in ("prefix", "suffix")]
    runs = [Config(size, where, k, device) for where, k in configs]
    for run in runs:
        run.steps(2, record=False)  # warm-up: allocations, kernels, optimizer state
    # Rounds interleave the configurations, so a slower period of a shared machine hits each of them alike.
    for _ in range(args.rounds):
        for run in runs:
            run.steps(args.steps)
    records = [run.record() for run in runs]
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "size": size,
              "shape": dict(zip(("hidden", "layers", "heads", "ffn", "vocab", "batch", "seq"), SIZES[size])),
              "records": records}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "freezing_prefix.json").write_text(json.dumps(result, indent=2))
    base = records[0]["step_ms"]
    for r in records:
        print(f"{r['frozen']:>6} {r['layers_frozen']:>3} layers: {r['step_ms']:8.1f} ms/step "
              f"({r['step_ms'] / base:.2f}x), {r['trainable_params']:,} of {r['total_params']:,} parameters train")


if __name__ == "__main__":
    main()
