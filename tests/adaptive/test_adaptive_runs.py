"""The adaptive model in the run machinery: the target-speedup search, the FLOP ceiling, lm-eval through the
evaluator seam, exit=hierarchical in config, and (slow) pretrain.py runs: the capacity sweep as a Hydra multirun,
resume, and athena.adaptive.infer on the run's checkpoint."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from athena.adaptive import HierarchicalAdaptiveWrapper, search_capacity_for_speedup
from athena.adaptive.speed import Shapes, flop_ceiling
from athena.config import validate_config
from athena.errors import ConfigError
from helpers import ROOT, composed, run_script, script_env


def test_target_speedup_search_converges_on_a_monotone_timing():
    def seconds(capacity):  # synthetic: 30% of the time does not depend on capacity
        return 0.3 + 0.7 * capacity

    found = search_capacity_for_speedup(1.6, seconds, tolerance=0.005)
    exact = (1 / 1.6 - 0.3) / 0.7  # where the speedup is exactly 1.6
    assert found.reached and found.speedup >= 1.6 and exact - 0.005 <= found.capacity <= exact
    assert len(found.trace) <= 12
    unreachable = search_capacity_for_speedup(5.0, seconds)  # even capacity 0.1 gives 1/0.37 = 2.7x
    assert not unreachable.reached and unreachable.capacity == 0.1


def test_flop_ceiling_counts_the_lm_head_and_exits():
    tiny_llama = Shapes(hidden=2048, ffn=5632, layers=22, heads=32, kv_heads=4, vocab=32000)
    smollm2 = Shapes(hidden=576, ffn=1536, layers=30, heads=9, kv_heads=3, vocab=49152)
    assert flop_ceiling(tiny_llama, 512, 1.0) == 1.0
    # SmolLM2's LM head is a larger share of its FLOPs, so skipping FFNs buys it less
    assert flop_ceiling(smollm2, 512, 0.55) < flop_ceiling(tiny_llama, 512, 0.55) < 1 / (1 - 0.45 * 0.75)
    with_exits = flop_ceiling(tiny_llama, 512, 0.55, {4: 0.1, 8: 0.1, 12: 0.1, 16: 0.1, 19: 0.1})
    assert with_exits > 1.5 * flop_ceiling(tiny_llama, 512, 0.55) / 1.2


def test_exit_hierarchical_composes_validates_and_names_bad_values():
    run = validate_config(composed("experiment=lm_smoke", "exit=hierarchical", "exit.capacity=0.4"))
    assert run.exit.name == "hierarchical" and run.exit.capacity == 0.4 and run.exit.exit_layers is None
    with pytest.raises(ConfigError, match=r"exit\.capacity: Input should be less than or equal to 1"):
        validate_config(composed("experiment=lm_smoke", "exit=hierarchical", "exit.capacity=1.5"))
    with pytest.raises(ConfigError, match=r"exit\.phase"):
        validate_config(composed("experiment=lm_smoke", "exit=hierarchical", "exit.phase=gates"))


def test_lm_eval_scores_the_wrapped_model_through_the_evaluator_seam(tmp_path, one_thread):
    pytest.importorskip("lm_eval")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from athena.eval.evaluators import EvalContext
    from athena.eval.lm_eval import LMEvalEvaluator
    from athena.models.hf import causal_lm

    words = "the a cat dog sat ran on in mat tree red blue small big question answer".split()
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}, ":": len(words) + 2}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="<eos>", unk_token="<unk>",
                                        pad_token="<eos>")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "tasks").mkdir()
    rng = random.Random(0)
    rows = [{"question": " ".join(rng.choices(words, k=4)), "choices": [rng.choice(words), rng.choice(words)],
             "label": rng.randrange(2)} for _ in range(12)]
    data = tmp_path / "tasks" / "toy.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "tasks" / "toy.yaml").write_text(
        f"task: toy\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"question : {{question}} answer :\"\ndoc_to_choice: "
        "\"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    torch.manual_seed(0)
    base = causal_lm(len(tokenizer), 16, 1, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64,
                     num_layers=4)
    # causal routing: a token's decisions do not depend on how lm-eval pads or batches the other tokens
    model = HierarchicalAdaptiveWrapper(base, exit_layers=[2], capacity=0.5, routing="causal").eval()
    model.calibrate(torch.randint(0, len(tokenizer), (4, 12)), exit_rates=[0.3])
    report = LMEvalEvaluator(tasks=["toy"], batch_size=4, log_samples=True).evaluate(
        EvalContext(model=model, loader=(), device=torch.device("cpu"), data_dir=tmp_path))
    for row, sample in zip(rows, sorted(report.per_sample["toy"], key=lambda s: s["doc_id"])):
        prompt = tokenizer(f"question : {row['question']} answer :").input_ids
        for choice, (loglik, _greedy) in zip(row["choices"], sample["responses"]):
            ids = torch.tensor([prompt + tokenizer(choice).input_ids])
            with torch.no_grad():
                logprobs = model(ids).logits[0].double().log_softmax(-1)
            direct = sum(logprobs[len(prompt) + i - 1, t].item() for i, t in enumerate(tokenizer(choice).input_ids))
            assert abs(loglik - direct) < 1e-4  # float32 forwards of a padded batch vs one sequence
    assert 0.0 <= report.results["toy"]["acc"] <= 1.0


@pytest.mark.slow
def test_capacity_sweep_runs_through_hydra_multirun_and_resumes(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    run_script("pretrain.py", "-m", "--config-dir", "sweeps", "--config-name", "capacity_toy",
               "train.checkpoint_every=2", f"hydra.sweep.dir={sweep}", data_root=data_root)
    for capacity, routed in (("1.0", 1.0), ("0.55", 35 / 64)):  # lm_smoke's sequences hold 64 tokens
        job = sweep / f"capacity_{capacity}"
        assert json.loads((job / "eval" / "final.json").read_text())["step"] == 4
        logged = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        trained = [m for m in logged if "exit/capacity_0" in m]
        assert trained and all(abs(m["exit/capacity_0"] - routed) < 1e-9 for m in trained)
        assert all("train/router_z_loss" in m for m in trained if capacity != "1.0")
    # resume: 2 steps from the job's step-2 checkpoint end where the uninterrupted 4 steps ended, bit for bit
    job = sweep / "capacity_0.55"
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "checkpoints" / "last.pt").write_bytes((job / "checkpoints" / "step_2.pt").read_bytes())
    run_script("pretrain.py", "--config-dir", "sweeps", "--config-name", "capacity_toy", "exit.capacity=0.55",
               "resume=auto", f"hydra.run.dir={resumed}", data_root=data_root)
    straight = torch.load(job / "checkpoints" / "step_4.pt", weights_only=True)["model"]
    again = torch.load(resumed / "checkpoints" / "step_4.pt", weights_only=True)["model"]
    trained_keys = [k for k in straight if k.startswith(("routers.", "gates."))]
    assert trained_keys and all(torch.equal(straight[k], again[k]) for k in trained_keys)
    # and the inference CLI reads the run's checkpoint: a capacity sweep table
    proc = subprocess.run([sys.executable, "-m", "athena.adaptive.infer", "--checkpoint",
                           str(job / "checkpoints" / "step_4.pt"), "--benchmark", "--batch", "2", "--seq-len", "32",
                           "--repeats", "1"], cwd=ROOT, env=script_env(data_root), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FLOP ceil" in proc.stdout and len([ln for ln in proc.stdout.splitlines() if "0.55" in ln]) >= 1


@pytest.mark.slow
def test_speed_bench_toy_mode_writes_its_record_and_plot(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "adaptive_speed.py"), "--toy", "--out", str(tmp_path)],
                          cwd=ROOT, env={**script_env(tmp_path), "MPLBACKEND": "Agg"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "adaptive_speed.json").read_text())
    assert (tmp_path / "adaptive_speed.png").stat().st_size > 0
    for model in record["models"]:
        rows = model["rows"]
        assert {(r["capacity"], r["exits"]) for r in rows} == {(c, e) for c in (0.9, 0.7, 0.55, 0.4)
                                                                for e in (False, True)}
        assert all(r["flop_ceiling"] > 1 and r["time_ceiling"] > 0 for r in rows)
        assert all(r["mean_depth"] < 1 for r in rows if r["exits"])  # the calibrated profile did exit tokens
        assert any("decode_speedup" in r for r in rows)
        # no setting left tensors behind: nothing for the cycle collector, no growth over the settings (a few
        # hundred bytes of per-forward state, stats and the last exit map, differ with the last call's shapes)
        assert all(r["memory"]["cyclic_garbage_mib"] == 0 for r in rows)
        assert max(r["memory"]["live_mib"] for r in rows) - model["live_mib_before_settings"] < 0.01
    assert "perplexity_increase" in record["models"][0]["rows"][0] and record["partial"] is False
