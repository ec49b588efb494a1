"""The LM evaluators against computations done by hand: lm-eval (in process, local task files) on a tiny random
Llama equals each choice's log-likelihood summed directly from the model's logits, and its rolling log-likelihood
equals the perplexity evaluator's; the perplexity evaluator equals torchmetrics' Perplexity. No hub, no SmolLM2."""

from __future__ import annotations

import json
import math
import random
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from torchmetrics.text import Perplexity  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from athena.data.format import write_split  # noqa: E402
from athena.data.format import PuzzleDataset  # noqa: E402
from athena.eval.evaluators import EvalContext  # noqa: E402
from athena.eval.lm_eval import LMEvalError, LMEvalEvaluator  # noqa: E402
from athena.eval.perplexity import PerplexityEvaluator  # noqa: E402
from athena.models.hf import causal_lm  # noqa: E402

WORDS = ("the a cat dog bird fish sat ran flew swam on in under over mat tree sea sky is was red blue green small "
         "big old new yes no colour of what where which question answer and").split()
SEQ_LEN = 16  # the data's (and so the random model's) sequence length


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer (whitespace split): tok(context + " " + choice) = tok(context) + tok(choice), so the
    hand computation below needs no knowledge of how lm-eval splits a context from its continuation."""
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}, ":": len(WORDS) + 2,
             "?": len(WORDS) + 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


@pytest.fixture
def text_data(tmp_path) -> tuple[Path, PreTrainedTokenizerFast]:
    """A dataset folder as the text builder leaves it, as far as the evaluators read it: tokenizer/ and tasks/."""
    tokenizer = word_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "tasks").mkdir()
    return tmp_path, tokenizer


def tiny_model(vocab_size: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return causal_lm(vocab_size, SEQ_LEN, 1, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64)


def context(model, data_dir: Path, loader=()) -> EvalContext:
    return EvalContext(model=model, loader=loader, device=torch.device("cpu"), data_dir=data_dir)


def write_task(data_dir: Path, name: str, rows: list[dict], body: str) -> None:
    """A local lm-eval task: <data dir>/tasks/<name>.jsonl + .yaml with an absolute data_files path."""
    data = data_dir / "tasks" / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (data_dir / "tasks" / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n{body}")


def multiple_choice_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        question = " ".join(rng.choices(WORDS, k=rng.randint(3, 6)))
        choices = [" ".join(rng.choices(WORDS, k=rng.randint(1, 3))) for _ in range(rng.randint(2, 4))]
        rows.append({"question": question, "choices": choices, "label": rng.randrange(len(choices))})
    return rows


MC_BODY = """output_type: multiple_choice
doc_to_text: "question : {{question}} ? answer :"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@torch.no_grad()
def choice_loglikelihood(model, tokenizer, prompt: str, choice: str) -> float:
    """log p(choice | prompt), summed over the choice's tokens, from one forward of prompt + choice."""
    prompt_ids, choice_ids = tokenizer(prompt).input_ids, tokenizer(choice).input_ids
    ids = torch.tensor([prompt_ids + choice_ids])
    logprobs = model(input_ids=ids).logits[0].double().log_softmax(-1)  # (len, vocab)
    # token choice_ids[i] sits at position len(prompt_ids) + i and is predicted by the position before it
    return sum(logprobs[len(prompt_ids) + i - 1, token].item() for i, token in enumerate(choice_ids))


def test_multiple_choice_task_equals_direct_loglikelihoods(text_data, one_thread):
    data_dir, tokenizer = text_data
    rows = multiple_choice_rows(16, seed=0)
    write_task(data_dir, "toy_choice", rows, MC_BODY)
    model = tiny_model(len(tokenizer))
    model.train()
    model.model.layers[1].eval()  # a module a run keeps in eval mode must stay so
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    rng_before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())

    report = LMEvalEvaluator(tasks=["toy_choice"], batch_size=5, log_samples=True).evaluate(context(model, data_dir))

    # by hand: each choice's log-likelihood, the argmax (acc) and the argmax per character of the choice (acc_norm)
    hits = hits_norm = 0
    for row, sample in zip(rows, sorted(report.per_sample["toy_choice"], key=lambda s: s["doc_id"])):
        prompt = f"question : {row['question']} ? answer :"
        lls = [choice_loglikelihood(model, tokenizer, prompt, choice) for choice in row["choices"]]
        # lm-eval batches several requests into one padded forward: float32 sums in another order (measured 9e-7)
        np.testing.assert_allclose([r[0] for r in sample["responses"]], lls, rtol=0, atol=1e-5)
        hits += int(np.argmax(lls) == row["label"])
        hits_norm += int(np.argmax(np.array(lls) / [len(c) for c in row["choices"]]) == row["label"])
    assert report.results["toy_choice"]["acc"] == hits / len(rows)
    assert report.results["toy_choice"]["acc_norm"] == hits_norm / len(rows)
    assert report.samples == {"toy_choice": len(rows)} and report.score == hits / len(rows)
    assert report.metrics()["eval/toy_choice/acc"] == hits / len(rows)
    assert report.higher_is_better["toy_choice"] == {"acc": True, "acc_norm": True}
    json.dumps(report.summary())  # eval/<name>.json must be writable

    # the run's model is left as it was: modes, weights (no re-tying), and the global random streams
    assert model.training and not model.model.layers[1].training and model.model.layers[0].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(torch.get_rng_state(), rng_before[0]) and random.getstate() == rng_before[1]
    assert np.array_equal(np.random.get_state()[1], rng_before[2])


def test_lm_eval_scores_the_model_with_its_adapters_and_precision(text_data, one_thread):
    """The model lm-eval scores is the run's model as it is: LoRA on every linear layer including lm_head (where
    HFLM's tie_weights() would raise: it re-ties `lm_head.weight`, now inside the adapter), run in the run's autocast
    (HFLM's own autocast, off unless told, would switch it off)."""
    from athena.adapters import AdapterConfig, add_adapters

    data_dir, tokenizer = text_data
    rows = multiple_choice_rows(4, seed=5)
    write_task(data_dir, "toy_choice", rows, MC_BODY)
    model = add_adapters(tiny_model(len(tokenizer)), AdapterConfig(method="lora", rank=2, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]))
    with torch.no_grad():  # trained-looking adapters (B starts at zero)
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    bf16 = partial(torch.autocast, device_type="cpu", dtype=torch.bfloat16)
    ctx = EvalContext(model=model, loader=(), device=torch.device("cpu"), data_dir=data_dir, autocast=bf16)
    report = LMEvalEvaluator(tasks=["toy_choice"], log_samples=True).evaluate(ctx)

    scored = [r[0] for sample in sorted(report.per_sample["toy_choice"], key=lambda s: s["doc_id"])
              for r in sample["responses"]]
    prompts = [(f"question : {row['question']} ? answer :", choice) for row in rows for choice in row["choices"]]
    with bf16():
        in_bf16 = [choice_loglikelihood(model, tokenizer, *pair) for pair in prompts]
    in_fp32 = [choice_loglikelihood(model, tokenizer, *pair) for pair in prompts]
    # measured: 2e-6 from the bf16 computation by hand, 0.99 from the fp32 one; bf16 forwards of other batch shapes
    # may round differently, hence 1e-2
    np.testing.assert_allclose(scored, in_bf16, rtol=0, atol=1e-2)
    assert np.abs(np.array(scored) - in_fp32).max() > 0.1
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight  # still tied, untouched


def packed_split(data_dir: Path, tokenizer, docs: list[str]) -> PuzzleDataset:
    """A packed test split in Athena's format: each row is the eos token then one document's tokens (what lm-eval's
    rolling log-likelihood scores: every token of the document, the first one after the eos prefix)."""
    ids = np.array([[tokenizer.eos_token_id] + tokenizer(doc).input_ids for doc in docs], dtype=np.int32)
    assert ids.shape == (len(docs), SEQ_LEN)
    n = len(docs)
    write_split(data_dir, "test", {"inputs": ids, "labels": ids, "puzzle_identifiers": np.zeros(n, np.int32),
                                   "puzzle_indices": np.arange(n + 1), "group_indices": np.arange(n + 1)},
                {"seq_len": SEQ_LEN, "vocab_size": len(tokenizer), "pad_id": tokenizer.eos_token_id,
                 "ignore_label_id": None, "num_puzzle_identifiers": 1})
    return PuzzleDataset(data_dir, "test")


def batches(dataset: PuzzleDataset, size: int):
    return [dataset[np.arange(start, min(start + size, len(dataset)))] for start in range(0, len(dataset), size)]


def test_rolling_loglikelihood_task_equals_perplexity_evaluator(text_data, one_thread):
    data_dir, tokenizer = text_data
    rng = random.Random(1)
    docs = [" ".join(rng.choices(WORDS, k=SEQ_LEN - 1)) for _ in range(7)]
    write_task(data_dir, "held_out", [{"text": doc} for doc in docs],
               "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
               "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    dataset = packed_split(data_dir, tokenizer, docs)
    model = tiny_model(len(tokenizer), seed=1).eval()

    rolling = LMEvalEvaluator(tasks=["held_out"], batch_size=3, log_samples=True).evaluate(context(model, data_dir))
    perplexity = PerplexityEvaluator(rows_per_forward=2).evaluate(context(model, data_dir, batches(dataset, 3)))

    lls = [sample["responses"][0] for sample in rolling.per_sample["held_out"]]
    assert perplexity.tokens == len(docs) * (SEQ_LEN - 1) and perplexity.sequences == len(docs)
    # float32 forwards batched differently; the sums are of ~100 terms of ~4 nats (measured 3e-6 relative)
    assert perplexity.nll_sum == pytest.approx(-sum(lls), rel=1e-5)
    words = sum(len(doc.split()) for doc in docs)
    assert rolling.results["held_out"]["word_perplexity"] == pytest.approx(math.exp(perplexity.nll_sum / words),
                                                                           rel=1e-5)
    assert rolling.higher_is_better["held_out"]["word_perplexity"] is False
    assert perplexity.perplexity == pytest.approx(math.exp(-sum(lls) / perplexity.tokens), rel=1e-5)


def test_perplexity_evaluator_equals_torchmetrics_on_a_fine_tuning_split(one_thread):
    """Unlabelled positions (-100: prompts, padding) count nowhere, rows split into several forwards or padded to a
    fixed batch (a compiled model) give the same sums, and the result is torchmetrics' Perplexity of the shifted
    logits: an independent implementation (softmax, then log)."""
    torch.manual_seed(0)
    vocab = 29
    model = tiny_model(vocab, seed=2).train()
    inputs = torch.randint(0, vocab, (5, SEQ_LEN))
    labels = inputs.clone()
    labels[:, :6] = -100  # the prompt
    labels[1, 12:] = -100  # right padding of a shorter answer
    labels[3, :] = -100  # nothing to score in this row
    loader = [{"inputs": inputs[:3], "labels": labels[:3]}, {"inputs": inputs[3:], "labels": labels[3:]}]

    with torch.no_grad():
        logits = model(input_ids=inputs).logits.double()
    reference = Perplexity(ignore_index=-100).set_dtype(torch.float64)
    reference.update(logits[:, :-1], labels[:, 1:])
    expected_tokens = int((labels[:, 1:] != -100).sum())

    for rows_per_forward, pad_to in ((None, None), (1, None), (2, 4)):
        ctx = EvalContext(model=model, loader=loader, device=torch.device("cpu"), data_dir=Path("."), pad_to=pad_to)
        report = PerplexityEvaluator(rows_per_forward=rows_per_forward).evaluate(ctx)
        assert report.tokens == expected_tokens and report.sequences == 5
        # float32 logits here against float64 in the reference: ~1e-7 relative per token
        assert report.perplexity == pytest.approx(reference.compute().item(), rel=1e-5)
        assert report.score == report.perplexity and report.metrics()["eval/loss"] == report.mean_loss
    assert model.training  # the mode is given back
    manual = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert report.mean_loss == pytest.approx(manual.item(), rel=1e-5)


def test_bad_model_dataset_or_arguments_stop_with_one_line(tmp_path, text_data):
    from helpers import small_model

    with pytest.raises(LMEvalError, match=r"scores Hugging Face causal LMs .*this model is a TinyRecursiveModel"):
        LMEvalEvaluator(tasks=["anything"]).evaluate(context(small_model(), text_data[0]))
    model = tiny_model(10)
    with pytest.raises(LMEvalError, match=r"no tokenizer in .*tokenizer: lm-eval needs a text dataset") as info:
        LMEvalEvaluator(tasks=["anything"]).evaluate(context(model, tmp_path / "puzzles"))
    assert "\n" not in str(info.value)
    with pytest.raises(LMEvalError, match=r"no tasks given: evaluator.tasks=\[name,...\]"):
        LMEvalEvaluator(tasks="???")
    with pytest.raises(LMEvalError, match="batch_size must be an int >= 1, got 'auto'"):
        LMEvalEvaluator(tasks=["x"], batch_size="auto")


@pytest.mark.slow
def test_unknown_and_unreachable_tasks_stop_with_one_line(text_data, one_thread):
    """A name that is neither local nor installed names the local tasks; an installed task whose dataset is on the
    hub (unreachable offline, not in the cache) names the dataset. Both build lm-eval's index of installed tasks
    (16-40 s, once for the evaluator)."""
    data_dir, tokenizer = text_data
    write_task(data_dir, "toy_choice", multiple_choice_rows(2, seed=0), MC_BODY)
    model = tiny_model(len(tokenizer))
    evaluator = LMEvalEvaluator(tasks=["no_such_task_anywhere"])
    with pytest.raises(LMEvalError, match=r"no task 'no_such_task_anywhere': the dataset's own tasks are toy_choice"):
        evaluator.evaluate(context(model, data_dir))
    evaluator.tasks = ["lambada_openai"]  # same evaluator: its index is reused
    with pytest.raises(LMEvalError, match=r"Couldn't reach 'EleutherAI/lambada_openai'.*offline") as info:
        evaluator.evaluate(context(model, data_dir))
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_evaluate_py_runs_both_evaluators_on_a_causal_lm_checkpoint(text_data, tmp_path, one_thread):
    """`python evaluate.py checkpoint=... evaluator=lm_eval eval.tasks=[...]` and `evaluator=perplexity` on a
    checkpoint of a random Llama (written as pretrain.py writes one) give the numbers the evaluators give in process."""
    from athena.checkpoint import save_checkpoint
    from athena.config import validate_config
    from athena.models.build import build_model
    from helpers import composed, last_line_error, run_script

    data_dir, tokenizer = text_data
    rows = multiple_choice_rows(6, seed=3)
    write_task(data_dir, "toy_choice", rows, MC_BODY)
    rng = random.Random(2)
    docs = [" ".join(rng.choices(WORDS, k=SEQ_LEN - 1)) for _ in range(5)]
    packed_split(data_dir, tokenizer, docs)
    shutil.copytree(data_dir / "test", data_dir / "train")  # a dataset has a train split too
    config = composed("arch=hf_causal_lm", "arch.hidden_size=32", "data=sudoku4", f"data.dir={data_dir}",
                      "data.name=toy_text")
    run_cfg = validate_config(config)
    torch.manual_seed(0)
    model = build_model(run_cfg, PuzzleDataset(data_dir, "test").metadata)
    run_dir = tmp_path / "run"
    checkpoint = save_checkpoint({"model": model.state_dict(), "ema": None, "step": 7, "config": run_cfg.resolved()},
                                 run_dir / "checkpoints", 7, keep=1)

    proc = run_script("evaluate.py", f"checkpoint={checkpoint}", "eval.weights=raw", "evaluator=lm_eval",
                      "eval.tasks=[toy_choice]", "eval.name=choice", data_root=tmp_path / "cache")
    written = json.loads((run_dir / "eval" / "choice.json").read_text())
    direct = LMEvalEvaluator(tasks=["toy_choice"]).evaluate(context(model.eval(), data_dir))
    assert written["tasks"] == direct.results and written["step"] == 7, proc.stdout[-2000:]
    assert "toy_choice: acc" in proc.stdout
    refused = run_script("evaluate.py", f"checkpoint={checkpoint}", "eval.tasks=[toy_choice]", check=False,
                         full_errors=False, data_root=tmp_path / "cache")  # the run's own evaluator is not lm-eval
    assert last_line_error(refused) == ("error: eval.tasks names lm-eval tasks, but this evaluation is not lm-eval: "
                                        "add evaluator=lm_eval")

    run_script("evaluate.py", f"checkpoint={checkpoint}", "eval.weights=raw", "evaluator=perplexity",
               "eval.batch_size=2", "eval.name=held_out", data_root=tmp_path / "cache")
    written = json.loads((run_dir / "eval" / "held_out.json").read_text())
    dataset = PuzzleDataset(data_dir, "test")
    direct = PerplexityEvaluator().evaluate(context(model, data_dir, batches(dataset, 2)))
    assert written["tokens"] == direct.tokens == len(docs) * (SEQ_LEN - 1)
    assert written["perplexity"] == pytest.approx(direct.perplexity, rel=1e-6)  # the same forwards, another process
