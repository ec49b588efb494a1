"""Speed and quality of exit gates + capacity routers (athena.adaptive) on one GPU, against their ceilings.

    python bench/adaptive_speed.py --out docs/results/adaptive           # H200, <= 3 minutes
    python bench/adaptive_speed.py --toy --out /tmp/adaptive_toy          # tiny random Llama on the CPU, seconds

Two models, bf16, eager:
- SmolLM2-135M (real weights, athena.models.hf.smollm2_dir) on held-out real text: the docstrings of Python's
  standard library source (parsed, never imported), cut into sequences of --seq-len tokens;
- a TinyLlama-shaped random Llama (hidden 2048, FFN 5632, 22 layers, 32 heads / 4 KV heads, vocab 32000), where
  only speed is measured.
For capacity in (0.9, 0.7, 0.55, 0.4), with and without exits (gate thresholds calibrated to a fixed exit profile:
--exit-rate of the tokens at each of the five gates, since the gates here are untrained), per setting:
- prefill time of --batch x --seq-len tokens (median of --repeats, CUDA events) and its speedup over dense
  (the wrapper at capacity 1.0 without exits, which equals the base's forward) and over the plain HF base;
- the time ceiling: the same forward with the skipped work removed outright (the FFN on a contiguous slice of
  round(c x active) tokens, exited tokens dropped from queries as a contiguous tail), no router, no gather/scatter;
- the FLOP ceiling from the shapes (athena.adaptive.speed.flop_ceiling; LM head counted);
- decode: ms per generated token with the KV cache (batch 1, causal routing), against dense decoding;
- SmolLM2 only: held-out perplexity and its increase over dense. The routers and gates are untrained (router
  scores of a random projection): an honest lower bound on what trained ones give.
Between settings: what the setting left in memory (row "memory": live tensors counted before a garbage
collection, what the collection freed, CUDA allocated/peak), then gc + empty_cache so settings do not disturb each
other's timing; a line warns when live tensors grew across settings.
Writes <out>/adaptive_speed.json after every setting ("partial": true until the run ends, so a run that stops keeps
its rows) and at the end <out>/adaptive_speed.png (perplexity increase vs measured speedup, with the ceilings).
"""

from __future__ import annotations

import argparse
import ast
import gc
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from athena.adaptive.capacity_router import round_half_up  # noqa: E402
from athena.adaptive.speed import Shapes, flop_ceiling, live_tensor_bytes, measure_seconds  # noqa: E402
from athena.adaptive.wrapper import (  # noqa: E402
    HierarchicalAdaptiveWrapper,
    LMOutput,
    apply_rotary,
    rotate_half,
)

CAPACITIES = (0.9, 0.7, 0.55, 0.4)
# growth of live tensors across settings that is reported as a leak: above allocator noise and small per-forward
# state (stats, the last exit map); a leaked SmolLM2 logits tensor at 32 x 512 is 1.5 GiB
LEAK_WARN_MIB = 256


class CeilingWrapper(HierarchicalAdaptiveWrapper):
    """The adaptive forward with its skipped work removed outright and no routing: each sequence's active tokens are
    a contiguous head of `active[i]` positions (exited ones the tail), the FFN runs on the first round(c x active)
    of them. Keys/values are computed for every token, as in the real forward. Its time is the ceiling.

    Eval only (no grad). Residual adds go in place into the head slice of the one hidden-state buffer: no torch.cat
    (which copied all B x L x D states twice a layer) and the rotary applied once per tensor (apply_rotary(q, q) /
    (k, k) did it twice). What is left beyond the dense forward's own operations is only the row copy that F.linear
    makes of a strided head slice (the real forward's gather does that copy too); at n = L and capacity 1 it runs
    exactly the dense operations. It returns the wrapper's LMOutput: a class built per call with type() sits in a
    reference cycle and kept its logits alive until a full garbage collection (the H200 OOM of 2026-12-05)."""

    active_per_layer: list[int] = []

    @torch.no_grad()
    def forward(self, input_ids, **unused):
        B, L = input_ids.shape
        h = self.parts.embed(input_ids)
        cos, sin = self.parts.rotary(h, torch.arange(L, device=h.device)[None])
        for i, layer in enumerate(self.parts.layers):
            n = self.active_per_layer[i] if self.active_per_layer else L
            if n == 0:
                break
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            hd = attn.head_dim
            k = attn.k_proj(x).view(B, L, -1, hd).transpose(1, 2)
            v = attn.v_proj(x).view(B, L, -1, hd).transpose(1, 2)
            if n == L:
                q = attn.q_proj(x).view(B, L, -1, hd).transpose(1, 2)
                q, k = apply_rotary(q, k, cos, sin)
            else:
                q = attn.q_proj(x[:, :n]).view(B, n, -1, hd).transpose(1, 2)
                q = rotate(q, cos[:, :n], sin[:, :n])
                k = rotate(k, cos, sin)
            # a head block of queries over all keys: top-left causal alignment is exactly causal here
            out = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1, scale=attn.scaling,
                                                 enable_gqa=q.shape[1] != k.shape[1])
            head = h if n == L else h[:, :n]
            head += attn.o_proj(out.transpose(1, 2).reshape(B, n, -1))
            m = round_half_up(self.capacity * n) if self.capacity < 1 else n
            if m:
                head = h if m == L else h[:, :m]
                head += layer.mlp(layer.post_attention_layernorm(head))
        return LMOutput(logits=self.parts.lm_head(self.parts.norm(h)))


def rotate(x, cos, sin):
    """apply_rotary on one tensor ((batch, heads, seq, head_dim); cos/sin (batch, seq, head_dim))."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def stdlib_text(max_chars: int) -> str:
    """Docstrings of Python's standard library source files (parsed with ast, not imported), in file order."""
    pieces, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    pieces.append(doc)
                    total += len(doc)
        if total >= max_chars:
            break
    return "\n\n".join(pieces)


def build_models(args, device):
    """[(name, base model, held-out ids or None)]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dtype = torch.float32 if args.toy else torch.bfloat16
    out = []
    if args.toy:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        small = LlamaForCausalLM(config).to(device).eval()
        held_out = torch.randint(0, 256, (8, args.seq_len), generator=torch.Generator().manual_seed(1))
        out.append(("toy_llama", small, held_out))
        big = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=96, intermediate_size=264,
                                           num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=512)).to(device).eval()
        out.append(("tinyllama_shape_toy", big, None))
        return out
    from athena.models.hf import smollm2_dir

    folder = smollm2_dir()
    smol = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                attn_implementation="sdpa").to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tokenizer(stdlib_text(args.heldout_sequences * args.seq_len * 6)).input_ids
    usable = len(ids) // args.seq_len * args.seq_len
    held_out = torch.tensor(ids[:usable]).view(-1, args.seq_len)[: args.heldout_sequences]
    out.append(("smollm2_135m", smol, held_out))
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096)
    with torch.device(device):
        torch.manual_seed(0)
        tiny = LlamaForCausalLM(config).to(dtype).eval()
    out.append(("tinyllama_shape_random", tiny, None))
    return out


@torch.no_grad()
def perplexity(model, held_out, device, batch: int) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(held_out), batch):
        ids = held_out[start:start + batch].to(device)
        logits = model(ids).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def decode_ms(model, prompt, new_tokens: int, device, repeats: int) -> float:
    """ms per generated token (greedy, KV cache), the prompt's prefill excluded."""
    def run():
        model.generate(prompt, max_new_tokens=new_tokens)

    total = measure_seconds(run, device, repeats=repeats, warmup=1)
    prefill = measure_seconds(lambda: model.generate(prompt, max_new_tokens=1), device, repeats=repeats, warmup=1)
    return 1000 * (total - prefill) / max(new_tokens - 1, 1)


def settle_memory(device) -> dict:
    """Between settings: what a setting left behind, then a clean slate for the next one's timing. live_mib is
    counted before collecting (cyclic garbage included); cyclic_garbage_mib is what the collection then freed (0
    unless something builds reference cycles around tensors); a growing live_mib across rows is a leak."""
    before = live_tensor_bytes(device)
    gc.collect()
    after = live_tensor_bytes(device)
    out = {"live_mib": before / 2**20, "cyclic_garbage_mib": (before - after) / 2**20}
    if torch.device(device).type == "cuda":
        out["cuda_allocated_mib"] = torch.cuda.memory_allocated(device) / 2**20
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return out


def bench_model(name, base, held_out, args, device, records: list, save) -> dict:
    """Appends this model's record to `records` at once and calls save() after every row, so a run that stops
    keeps what it measured."""
    shapes = Shapes.of(base.config)
    model = HierarchicalAdaptiveWrapper(base, capacity=1.0).eval()
    model.collect_stats = True
    ceiling = CeilingWrapper(base, exit_layers=model.exit_layers).eval()
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(2)).to(device)
    sample = held_out[: args.batch].to(device) if held_out is not None else ids
    model.calibrate(sample, exit_rates=[args.exit_rate] * len(model.exit_layers))
    prompt = ids[:1, : args.prompt_len]

    def time_of(m):
        return measure_seconds(lambda: m(ids), device, repeats=args.repeats, warmup=args.warmup)

    record = {"model": name, "shapes": shapes.__dict__, "batch": args.batch, "seq_len": args.seq_len,
              "exit_layers": model.exit_layers, "exit_rate_per_gate": args.exit_rate, "rows": []}
    records.append(record)
    baseline = settle_memory(device)["live_mib"]
    record["live_mib_before_settings"] = baseline
    with torch.no_grad():
        record["hf_base_prefill_ms"] = 1000 * time_of(base)
        model.capacity, model.exits_enabled = 1.0, False
        dense = time_of(model)
        record["dense_prefill_ms"] = 1000 * dense
        record["dense_decode_ms_per_token"] = decode_ms(model, prompt, args.new_tokens, device, args.repeats)
        dense_ppl = perplexity(model, held_out, device, args.batch) if held_out is not None else None
        record["dense_perplexity"] = dense_ppl
        for exits in (False, True):
            for capacity in CAPACITIES:
                model.capacity, model.exits_enabled = capacity, exits
                seconds = time_of(model)
                model(ids)  # the realised profile of this batch
                stats = model.last_stats
                profile = ({layer: n / stats.tokens for layer, n in zip(model.exit_layers, stats.exits)}
                           if exits else {})
                active = [round(a / args.batch) for a in stats.active] if exits else []
                ceiling.capacity, ceiling.active_per_layer = capacity, active
                ceiling_seconds = time_of(ceiling)
                row = {"capacity": capacity, "exits": exits, "prefill_ms": 1000 * seconds,
                       "speedup": dense / seconds, "speedup_vs_hf_base": record["hf_base_prefill_ms"] / 1000 / seconds,
                       "time_ceiling": dense / ceiling_seconds, "flop_ceiling": flop_ceiling(shapes, args.seq_len,
                                                                                             capacity, profile),
                       "realised_capacity": stats.realised_capacity, "exit_profile": profile,
                       "mean_depth": (sum(l * s for l, s in profile.items()) + shapes.layers * (1 - sum(
                           profile.values()))) / shapes.layers}
                row["share_of_time_ceiling"] = (row["speedup"] - 1) / (row["time_ceiling"] - 1) if row[
                    "time_ceiling"] > 1.0001 else None
                if capacity == 0.55:
                    model.routing = "causal"
                    row["decode_ms_per_token"] = decode_ms(model, prompt, args.new_tokens, device, args.repeats)
                    row["decode_speedup"] = record["dense_decode_ms_per_token"] / row["decode_ms_per_token"]
                    model.routing = "topk"
                if held_out is not None:
                    row["perplexity"] = perplexity(model, held_out, device, args.batch)
                    row["perplexity_increase"] = row["perplexity"] / dense_ppl - 1
                row["memory"] = settle_memory(device)
                record["rows"].append(row)
                save()
                grown = row["memory"]["live_mib"] - baseline
                print(f"{name}: capacity {capacity} exits {exits}: {row['speedup']:.2f}x (time ceiling "
                      f"{row['time_ceiling']:.2f}x, FLOP ceiling {row['flop_ceiling']:.2f}x)"
                      + (f", perplexity +{100 * row['perplexity_increase']:.1f}%" if held_out is not None else "")
                      + (f"; WARNING: {grown:.0f} MiB more live tensors than before the settings (a leak)"
                         if grown > LEAK_WARN_MIB else ""), flush=True)
    return record


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(records), figsize=(6 * len(records), 4.5), squeeze=False)
    for ax, record in zip(axes[0], records):
        for exits, marker in ((False, "o"), (True, "s")):
            rows = [r for r in record["rows"] if r["exits"] == exits]
            # capacity on y, not perplexity: untrained routers put perplexity orders of magnitude apart, which
            # hides the speed comparison this plot is for (perplexity is in the JSON and the printed lines)
            x, y = [r["speedup"] for r in rows], [r["capacity"] for r in rows]
            ax.set_ylabel("capacity")
            label = "with exits" if exits else "FFN routing only"
            ax.plot(x, y, marker=marker, label=f"{label}: measured")
            ax.plot([r["time_ceiling"] for r in rows], y, marker=marker, linestyle="--", alpha=0.6,
                    label=f"{label}: time ceiling")
            ax.plot([r["flop_ceiling"] for r in rows], y, marker=marker, linestyle=":", alpha=0.6,
                    label=f"{label}: FLOP ceiling")
        ax.axvline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("prefill speedup over dense")
        ax.set_title(f"{record['model']} (batch {record['batch']} x {record['seq_len']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toy", action="store_true", help="tiny random Llamas on the CPU (the plumbing)")
    parser.add_argument("--out", required=True, help="folder for adaptive_speed.json and .png")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--exit-rate", type=float, default=0.06, help="share of tokens leaving at each gate")
    parser.add_argument("--heldout-sequences", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    defaults = dict(batch=2, seq_len=32, repeats=1) if args.toy else dict(batch=32, seq_len=512, repeats=10)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.toy:
        args.prompt_len, args.new_tokens, args.heldout_sequences, args.warmup = 8, 4, 8, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.toy else "cpu")
    began = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "seconds": 0.0, "routers": "untrained (random projections): a lower bound on quality",
              "partial": True, "models": records}

    def save() -> None:
        result["seconds"] = time.time() - began
        (out / "adaptive_speed.json").write_text(json.dumps(result, indent=2))

    for name, base, held_out in build_models(args, device):
        bench_model(name, base, held_out, args, device, records, save)
    result["partial"] = False
    save()
    plot(records, out / "adaptive_speed.png")
    print(f"wrote {out / 'adaptive_speed.json'} and adaptive_speed.png in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
