"""AutoRank on SmolLM2 + LoRA against the other ways to spend the same rank budget, on one offline lm-eval task.

    python bench/autorank_smollm2.py --tasks-dir <sft_wordnet_gloss data dir>/tasks --task wordnet_gloss \
        --out docs/results/autorank                           # one GPU, <= 3 minutes
    python bench/autorank_smollm2.py --toy --out /tmp/ar      # a tiny random Llama on a made-up task, CPU, seconds

Budget: total LoRA rank = 8 x the number of adapted modules (30 layers x q/k/v/o/gate/up/down: 1,680), i.e. what
uniform rank 8 spends. At that budget:
- uniform: rank 8 on every module;
- importance: analyze_layer_importance (|grad . weight| over 4 batches) -> set_dynamic_rank_allocation(2..16);
- autorank: the GP search (athena.adapters.autorank.AutoRank) over 12 slots (5 layers x {attention, MLP} share a
  rank; ranks {0, 2, 4, 8, 16}), each trial a short low-fidelity run scored by validation answer loss;
- random: RandomRankSearch with the same trials, seed and budget;
- adalora: peft's AdaLoRA (init_r 12 -> target_r 8: the same final total rank), which allocates during training.
Then every pattern (and AdaLoRA) trains the same longer run from the same base, batches and seed, and is scored by
validation answer loss and multiple-choice accuracy on the task's held-out test items (lm-eval's `acc`: the choice
with the highest summed log-likelihood after the prompt; computed here so the script needs no lm-eval).

The task folder is what `data=sft_wordnet_gloss` builds (<data dir>/tasks/<task>{.train,.validation,}.jsonl; each
item prompt, choices, label). A trial is a plain loop (answer-only loss through the model's own `labels` loss,
AdamW, bf16 autocast on a GPU), not the Hydra recipe: sweeps/autorank.yaml runs the search through pretrain.py.
Writes <out>/autorank_smollm2.json, the two searches' trials files and their report (table, rank heatmap,
best-so-far curves) under <out>/report/.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from athena.adapters import AdapterConfig, add_adapters  # noqa: E402
from athena.adapters.autorank import (AutoRank, RandomRankSearch, RankSpace, analyze_layer_importance,  # noqa: E402
                                      set_dynamic_rank_allocation)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GROUPS = {"attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
IGNORE = -100


# ---------------------------------------------------------------------------------------------------- setup
class ByteTokenizer:
    """The toy's tokenizer: UTF-8 bytes (+ a pad id)."""

    pad_token_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class HFTokenizer:
    def __init__(self, folder: Path):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(folder)
        self.pad_token_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids


def load_model(args, device: torch.device):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.toy:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        return LlamaForCausalLM(config).to(device), ByteTokenizer()
    from athena.models.hf import smollm2_dir

    folder = Path(args.model_dir) if args.model_dir else smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)  # bf16 autocast in use
    return model, HFTokenizer(folder)


def toy_items(n: int, seed: int) -> list[dict]:
    """A made-up 4-way task a tiny model can start to learn: the answer is the prompt's word reversed."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefgh") for _ in range(4)) for _ in range(40)]
    items = []
    for _ in range(n):
        word = rng.choice(words)
        choices = [word[::-1]] + [w[::-1] for w in rng.sample([w for w in words if w != word], 3)]
        rng.shuffle(choices)
        items.append({"prompt": f"Word: {word}\nBack:", "choices": choices, "label": choices.index(word[::-1])})
    return items


def load_items(args) -> dict[str, list[dict]]:
    if args.toy:
        return {"train": toy_items(256, 0), "validation": toy_items(32, 1), "test": toy_items(32, 2)}
    folder = Path(args.tasks_dir)
    files = {"train": f"{args.task}.train.jsonl", "validation": f"{args.task}.validation.jsonl",
             "test": f"{args.task}.jsonl"}
    out = {}
    for split, name in files.items():
        path = folder / name
        if not path.is_file():
            sys.exit(f"error: {path} not found; --tasks-dir is <data dir>/tasks of a built sft dataset "
                     "(python pretrain.py experiment=lm_adapt data=sft_wordnet_gloss builds it)")
        out[split] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def answer_rows(tok, items: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels): prompt + " " + answer, the loss on the answer tokens only."""
    rows = []
    for item in items:
        prompt, answer = tok.encode(item["prompt"]), tok.encode(" " + item["choices"][item["label"]])
        rows.append((prompt + answer, [IGNORE] * len(prompt) + answer))
    return rows


def collate(rows, pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, :len(row_ids)] = torch.tensor(row_ids)
        labels[i, :len(row_labels)] = torch.tensor(row_labels)
        mask[i, :len(row_ids)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


# ---------------------------------------------------------------------------------------------------- one run
class Harness:
    def __init__(self, args, base, tok, items, device):
        self.args, self.base, self.tok, self.device = args, base, tok, device
        self.train_rows = answer_rows(tok, items["train"])
        self.val_rows = answer_rows(tok, items["validation"][:args.val_items])
        self.test_items = items["test"][:args.test_items]
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else (
            contextlib.nullcontext)

    def batches(self, steps: int):
        """The same batches, in the same order, for every run."""
        rng = random.Random(self.args.seed)
        for _ in range(steps):
            yield collate(rng.sample(self.train_rows, self.args.batch), self.tok.pad_token_id, self.device)

    def adapted(self, rank_pattern: dict[str, int]):
        return add_adapters(copy.deepcopy(self.base), AdapterConfig(method="lora", rank=8, alpha=16.0,
                                                                     target_modules=TARGETS,
                                                                     rank_pattern=rank_pattern))

    def train(self, model, steps: int, on_step=None) -> float:
        torch.manual_seed(self.args.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.args.lr, weight_decay=0.0)
        model.train()
        start = time.perf_counter()
        for step, batch in enumerate(self.batches(steps)):
            for group in opt.param_groups:  # linear warm-up over the first 10% of steps
                group["lr"] = self.args.lr * min(1.0, (step + 1) / max(1, steps // 10))
            with self.autocast():
                loss = model(**batch).loss
            loss.backward()
            if on_step is not None:
                on_step(step)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - start

    @torch.no_grad()
    def val_loss(self, model) -> float:
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(self.val_rows), 64):
            batch = collate(self.val_rows[i:i + 64], self.tok.pad_token_id, self.device)
            with self.autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels,
                                                    ignore_index=IGNORE, reduction="sum")
            total, count = total + nll.item(), count + int((labels != IGNORE).sum())
        return total / max(count, 1)

    @torch.no_grad()
    def accuracy(self, model) -> float:
        """Multiple-choice accuracy: the choice whose tokens after the prompt have the highest summed log-likelihood."""
        model.eval()
        pairs = [(i, self.tok.encode(item["prompt"]), self.tok.encode(" " + choice))
                 for i, item in enumerate(self.test_items) for choice in item["choices"]]
        scores = []
        for start in range(0, len(pairs), 128):
            chunk = pairs[start:start + 128]
            rows = [(p + c, [IGNORE] * len(p) + c) for _, p, c in chunk]
            batch = collate(rows, self.tok.pad_token_id, self.device)
            with self.autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logp = torch.log_softmax(logits[:, :-1].float(), -1)
            labels = batch["labels"][:, 1:]
            picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != IGNORE)
            scores += picked.sum(-1).tolist()
        correct, k = 0, 0
        for item in self.test_items:
            n = len(item["choices"])
            correct += int(max(range(n), key=lambda j: scores[k + j]) == item["label"])
            k += n
        return correct / max(len(self.test_items), 1)

    def trial(self, rank_pattern: dict[str, int]) -> float:
        """Low fidelity: a few steps, validation answer loss."""
        model = self.adapted(rank_pattern)
        self.train(model, self.args.trial_steps)
        loss = self.val_loss(model)
        del model
        return loss

    def final(self, model, steps: int, on_step=None) -> dict:
        seconds = self.train(model, steps, on_step)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {"val_loss": self.val_loss(model), "test_acc": self.accuracy(model), "train_seconds": seconds,
                "trainable_params_at_end": trainable}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------- the study
def adalora(h: Harness, steps: int) -> dict:
    """peft's AdaLoRA at the same final budget: start at rank 12, prune to an average of 8 per module."""
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, target_modules=TARGETS, total_step=steps,
                           tinit=max(1, steps // 10), tfinal=max(1, steps // 5), deltaT=max(1, steps // 20))
    model = get_peft_model(copy.deepcopy(h.base), config)
    result = h.final(model, steps, on_step=lambda step: model.base_model.update_and_allocate(step))
    ranks = {name: sum(map(bool, mask)) for name, mask in (model.peft_config["default"].rank_pattern or {}).items()}
    result.update(total_rank=sum(ranks.values()) or None, ranks_kept=ranks or None)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--toy", action="store_true", help="tiny random Llama on a made-up task, on the CPU")
    parser.add_argument("--tasks-dir", help="<data dir>/tasks of a built sft dataset (data=sft_wordnet_gloss)")
    parser.add_argument("--task", default="wordnet_gloss")
    parser.add_argument("--model-dir", help="a Hugging Face folder (default: SmolLM2 from athena.models.hf)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--trials", type=int, default=12, help="per search (AutoRank and random)")
    parser.add_argument("--initial", type=int, default=4, help="AutoRank's random trials before the GP")
    parser.add_argument("--trial-steps", type=int, default=30)
    parser.add_argument("--final-steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--val-items", type=int, default=256)
    parser.add_argument("--test-items", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.toy:
        args.trials, args.initial, args.trial_steps, args.final_steps, args.batch = 4, 2, 3, 6, 8
    elif not args.tasks_dir:
        parser.error("--tasks-dir is required (or --toy)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.toy else "cpu")
    base, tok = load_model(args, device)
    for p in base.parameters():
        p.requires_grad_(False)
    h = Harness(args, base, tok, load_items(args), device)
    layers_per_slot = 1 if args.toy else 5
    space = RankSpace.from_model(base, rank_budget=8 * len(_targets(base)), layers_per_slot=layers_per_slot,
                                 module_groups=GROUPS, adapter_config={"target_modules": TARGETS})
    report = {"task": "toy" if args.toy else args.task, "device": torch.cuda.get_device_name() if device.type == "cuda"
              else "cpu", "budget": {"unit": "rank", "total_rank": space.budget, "modules": len(_targets(base)),
                                     "slots": [s.name for s in space.slots]},
              "settings": {k: v for k, v in vars(args).items() if k not in ("out",)}, "methods": {}, "search": {}}
    report["zero_shot_test_acc"] = h.accuracy(base)

    patterns = {"uniform": space.rank_pattern(space.uniform())}
    importance = analyze_layer_importance(copy.deepcopy(base), h.batches(4), adapter_config={"target_modules": TARGETS})
    patterns["importance"] = set_dynamic_rank_allocation(base, importance, min_rank=2, max_rank=16,
                                                         rank_budget=space.budget, apply=False,
                                                         adapter_config={"target_modules": TARGETS})
    for name, searcher in (("autorank", AutoRank), ("random", RandomRankSearch)):
        trials_file = out / name / "autorank_trials.jsonl"
        trials_file.unlink(missing_ok=True)
        tic = time.perf_counter()
        search = searcher(space=space, num_trials=args.trials, n_initial=args.initial, direction="minimize",
                          seed=args.seed, trials_file=trials_file)
        best = search.search(h.trial)
        patterns[name] = best.rank_pattern
        curve = search.best_so_far()
        report["search"][name] = {"seconds": time.perf_counter() - tic, "values": [t.value for t in search.trials],
                                  "best_so_far": curve, "best_trial": best.number,
                                  "best_ranks": dict(zip(report["budget"]["slots"], best.choice))}
    report["search"]["trials_to_beat_random"] = next(
        (i + 1 for i, v in enumerate(report["search"]["autorank"]["best_so_far"])
         if v is not None and v <= report["search"]["random"]["best_so_far"][-1]), None)

    for name, pattern in patterns.items():
        model = h.adapted(pattern)
        result = h.final(model, args.final_steps)
        result.update(total_rank=sum(pattern.values()), trainable_params=result.pop("trainable_params_at_end"))
        report["methods"][name] = result
        del model
    report["methods"]["adalora"] = adalora(h, args.final_steps)
    report["seconds"] = time.perf_counter() - started

    from athena.report.autorank import write_autorank_report

    report["report"] = [str(p) for p in write_autorank_report(out / "autorank", out / "report", out / "random")]
    (out / "autorank_smollm2.json").write_text(json.dumps(report, indent=1) + "\n")
    for name, result in report["methods"].items():
        print(f"{name:>10}: total rank {result['total_rank']}, val loss {result['val_loss']:.4f}, "
              f"test acc {100 * result['test_acc']:.1f}%")
    print(f"zero-shot test acc {100 * report['zero_shot_test_acc']:.1f}%; {report['seconds']:.0f} s; "
          f"{out / 'autorank_smollm2.json'}")


def _targets(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TARGETS]


if __name__ == "__main__":
    main()
