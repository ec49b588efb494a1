"""The text corpus builder: fetch, clean, split, tokenize and pack text into Athena's on-disk format.

    data.build: {_target_: athena.data.text.build_text, sources: {fortunes: {}, wordnet: {test: 0.02}, ...},
                 tokenizer: smollm2 | bpe:<vocab size> | <local tokenizer dir>, seq_len: 512, ...}

Steps: each source's package is fetched into a download cache (athena.data.text_fetch) and cleaned into documents
(athena.data.text_sources); documents are cut into units of whole paragraphs, duplicates dropped, and the units of
each source drawn into train / validation / test (seeded; a unit lies wholly in one split). The tokenizer is
SmolLM2's, or a byte-level BPE trained on the train split only. Then, in the built folder:

    train/ validation/ test/   train_on=lm: packed language modelling. Each unit's tokens then eos, concatenated
                               source by source in a fixed order and cut into rows of seq_len (the tail shorter than a
                               row is dropped); labels = inputs, ignore_label_id null; one example per puzzle and
                               per group. train_on=<task>: that task's supervised fine-tuning split instead: prompt +
                               " " + answer + eos right-padded with pad_id, labels -100 except on the answer and eos
    tokenizer/                 the tokenizer the ids come from (save_pretrained)
    tasks/<name>.yaml, .jsonl  the labelled tasks (athena.data.text_tasks) for lm-eval, absolute data_files
    text/<split>/<source>.txt  the clean text of each split, units separated by blank lines
    stats.json                 packages, MB and tokens per source and split, task sizes, timings
"""

from __future__ import annotations

import json
import os
import re
import time
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm.auto import tqdm

from athena.data.build import final_dir, parallel_map
from athena.data.format import DatasetError, write_identifiers, write_split
from athena.data.text_fetch import fetch_package
from athena.data.text_sources import SOURCES, Document
from athena.data.text_tasks import SPLITS, TASKS, Unit, make_task, write_task

IGNORE_LABEL = -100
SOURCE_OPTIONS = ("validation", "test", "max_mb")
# Topics of data.build.fortune_topics when it is null: the topic files whose fortunes are about one subject.
DEFAULT_FORTUNE_TOPICS = ["art", "computers", "education", "food", "kids", "law", "linux", "love", "medicine",
                          "men-women", "pets", "politics", "science", "sports", "startrek", "work"]
TASK_OPTIONS = {"max_prompt_chars": 600, "passage_chars": 400, "cloze_min_words": 50, "cloze_context_chars": 1500}


def build_text(out_dir: str | Path, *, sources: dict | list, tokenizer: str, seq_len: int,
               validation_fraction: float = 0.01, test_fraction: float = 0.01, unit_chars: int = 2000, seed: int = 0,
               tasks: list[str] | None = None, train_on: str = "lm", sft_seq_len: int | None = None,
               task_train_items: int | None = 20000, task_eval_items: int | None = 1000,
               fortune_topics: list[str] | None = None, download_dir: str | None = None) -> None:
    """Build the text dataset described in the module docstring into `out_dir`.

    sources: {name: {validation, test, max_mb} or null} (or a list of names): validation / test are the fractions
    of the source's units held out (default validation_fraction / test_fraction), max_mb caps its clean text.
    tasks: the labelled tasks to write (null: every one the sources allow). train_on: "lm" or a task name.
    download_dir: the package cache (null: <data root>/downloads)."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    options = _source_options(sources, validation_fraction, test_fraction)
    names = sorted(options)
    _check_tokenizer_spec(tokenizer)
    task_options = TASK_OPTIONS | {
        "fortune_topics": list(fortune_topics or DEFAULT_FORTUNE_TOPICS), "source_names": names,
        "source_titles": {name: SOURCES[name].title for name in names},
        "cloze_sources": [name for name in names if SOURCES[name].prose]}
    chosen = _chosen_tasks(tasks, train_on, names, task_options)
    seconds: dict[str, float] = {}

    downloads = Path(download_dir) if download_dir else final_dir(out_dir).parent / "downloads"
    packages, units_by_source, units = fetch_and_split(names, options, downloads, unit_chars, seed)
    seconds["fetch + clean"] = time.perf_counter() - start
    write_text(out_dir / "text", units)
    tok = load_tokenizer(tokenizer, (u.text for name in names for u in units["train"][name]), out_dir / "tokenizer")
    seconds["tokenizer"] = time.perf_counter() - start - sum(seconds.values())

    # Labelled tasks; then the training splits: packed text, or one task's SFT examples.
    task_options["all_units"] = units_by_source
    _check_fortune_topics(task_options, units_by_source)
    task_items = {}
    for name in tqdm(chosen, desc="labelled tasks"):
        task_items[name] = make_task(TASKS[name], units, task_options, seed=seed, train_items=task_train_items,
                                     eval_items=task_eval_items)
        write_task(out_dir / "tasks", final_dir(out_dir) / "tasks", TASKS[name], task_items[name])
    seconds["tasks"] = time.perf_counter() - start - sum(seconds.values())
    write_identifiers(out_dir, ["<blank>"])
    if train_on == "lm":
        splits = {split: pack_split(out_dir, split, tok, units[split], names, seq_len) for split in SPLITS}
    else:
        splits = {split: sft_split(out_dir, split, tok, task_items[train_on].get(split, []), sft_seq_len or seq_len)
                  for split in SPLITS}
    seconds["encode"] = time.perf_counter() - start - sum(seconds.values())
    seconds["total"] = time.perf_counter() - start

    stats = {
        "sources": {name: {
            "package": packages[name],
            "documents": len({u.document for u in units_by_source[name]}),
            "units": {split: len(units[split][name]) for split in SPLITS},
            "mb": {split: round(sum(len(u.text.encode()) for u in units[split][name]) / 1e6, 3) for split in SPLITS},
        } for name in names},
        "splits": splits, "tasks": {name: {s: len(v) for s, v in items.items()} for name, items in task_items.items()},
        "tokenizer": {"spec": tokenizer, "vocab_size": len(tok), "eos_id": tok.eos_token_id, "pad_id": pad_id(tok)},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))


# ----------------------------------------------------------------------------------------------------- checks

def _source_options(sources: dict | list, validation: float, test: float) -> dict[str, dict]:
    if isinstance(sources, (list, tuple)):
        sources = {name: None for name in sources}
    if not sources:
        raise DatasetError(f"data.build.sources is empty; name at least one of {sorted(SOURCES)}")
    out = {}
    for name, given in sources.items():
        if name not in SOURCES:
            raise DatasetError(f"unknown text source {name!r} in data.build.sources; choose from {sorted(SOURCES)}")
        given = dict(given or {})
        unknown = sorted(set(given) - set(SOURCE_OPTIONS))
        if unknown:
            raise DatasetError(f"data.build.sources.{name} has unknown options {unknown}; allowed: {SOURCE_OPTIONS}")
        merged = {"validation": validation, "test": test, "max_mb": None} | given
        if not (0 <= merged["validation"] and 0 < merged["test"] and merged["validation"] + merged["test"] < 1):
            raise DatasetError(f"data.build.sources.{name}: held-out fractions validation={merged['validation']} "
                               f"test={merged['test']} must be >= 0, > 0 and sum below 1")
        out[name] = merged
    return out


def _check_tokenizer_spec(spec: str) -> None:
    if spec == "smollm2" or Path(spec).is_dir():
        return
    match = re.fullmatch(r"bpe:(\d+)", spec)
    if not match:
        raise DatasetError(f"data.build.tokenizer {spec!r} is not one of: smollm2, bpe:<vocab size> (e.g. bpe:8192), "
                           f"or a local Hugging Face tokenizer folder")
    if int(match.group(1)) <= 258:
        raise DatasetError(f"data.build.tokenizer {spec}: a byte-level BPE needs a vocabulary over 258 "
                           f"(256 bytes + 2 special tokens)")


def _chosen_tasks(tasks: list[str] | None, train_on: str, names: list[str], options: dict) -> list[str]:
    possible = [t for t, spec in TASKS.items() if spec.sources(names, options)]
    if tasks is None:
        chosen = possible
    else:
        for task in tasks:
            if task not in TASKS:
                raise DatasetError(f"unknown task {task!r} in data.build.tasks; choose from {sorted(TASKS)}")
            if task not in possible:
                raise DatasetError(f"task {task!r} cannot be made from the sources {names}; add the source it reads "
                                   f"(see athena/data/text_tasks.py) or drop the task")
        chosen = list(tasks)
    if train_on != "lm":
        if train_on not in TASKS or TASKS[train_on].output_type == "loglikelihood_rolling":
            trainable = [t for t in TASKS if TASKS[t].output_type != "loglikelihood_rolling"]
            raise DatasetError(f"data.build.train_on {train_on!r}: use lm or one of {trainable}")
        if train_on not in possible:
            raise DatasetError(f"data.build.train_on {train_on!r} cannot be made from the sources {names}")
        chosen = chosen if train_on in chosen else chosen + [train_on]
    return chosen


def _check_fortune_topics(options: dict, units_by_source: dict[str, list[Unit]]) -> None:
    if "fortunes" in units_by_source:
        found = {u.meta["topic"] for u in units_by_source["fortunes"]}
        missing = sorted(set(options["fortune_topics"]) - found)
        if missing:
            raise DatasetError(f"data.build.fortune_topics {missing} are not topic files of the fortunes package; "
                               f"choose from {sorted(found)}")


# ----------------------------------------------------------------------------------------------------- text

def fetch_and_split(names: list[str], options: dict[str, dict], downloads: Path, unit_chars: int, seed: int):
    """(file fetched per source, units per source, units per split per source): packages fetched one after the
    other, sources cleaned in parallel processes, each source split on its own."""
    fetched = {}
    for name in tqdm(names, desc="fetching text packages"):
        package = SOURCES[name].package
        fetched[name] = fetch_package(package, downloads) if package else (None, None)
    jobs = [(name, None if fetched[name][0] is None else str(fetched[name][0]), options[name]["max_mb"], unit_chars)
            for name in names]
    units_by_source = dict(zip(names, parallel_map(source_units, jobs, desc="cleaning text sources")))
    units: dict[str, dict[str, list[Unit]]] = {split: {} for split in SPLITS}
    for name in names:
        for split, chosen in split_units(units_by_source[name], options[name], seed, name).items():
            units[split][name] = chosen
    return {name: fetched[name][1] for name in names}, units_by_source, units


def source_units(job: tuple[str, str | None, float | None, int]) -> list[Unit]:
    """The units of one source: its documents (up to max_mb of clean text) cut into runs of whole paragraphs of
    about unit_chars, repeats of an earlier unit dropped (fortunes and dictionaries repeat entries)."""
    name, root, max_mb, unit_chars = job
    units, seen, size = [], set(), 0
    for number, document in enumerate(SOURCES[name].extract(Path(root) if root else None)):
        for part, paragraphs in enumerate(_chunks(document, unit_chars)):
            key = " ".join("\n".join(paragraphs).split()).lower()
            if key in seen:
                continue
            seen.add(key)
            units.append(Unit(name, number, part, paragraphs, document.meta))
        size += sum(len(p.encode()) for p in document.paragraphs)
        if max_mb is not None and size >= max_mb * 1e6:
            break
    if not units:
        raise DatasetError(f"text source {name} yielded no text; its package layout may have changed")
    return units


def _chunks(document: Document, unit_chars: int) -> Iterable[list[str]]:
    current: list[str] = []
    size = 0
    for paragraph in document.paragraphs:
        if current and size + len(paragraph) > unit_chars:
            yield current
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph)
    if current:
        yield current


def split_units(units: list[Unit], options: dict, seed: int, source: str) -> dict[str, list[Unit]]:
    """Seeded draw of whole units into test / validation / train, each kept in the source's order. A source's draw
    depends only on its own units, the seed and its name, so its held-out text is the same in every mix."""
    rng = np.random.default_rng([seed, zlib.crc32(source.encode())])
    n = len(units)
    n_test = max(1, round(n * options["test"]))
    n_validation = max(1 if options["validation"] > 0 else 0, round(n * options["validation"]))
    if n_test + n_validation >= n:
        raise DatasetError(f"text source {source} has only {n} units: too few for a train, validation and test "
                           f"split; lower its held-out fractions or its unit size (data.build.unit_chars)")
    order = rng.permutation(n)
    chosen = {"test": order[:n_test], "validation": order[n_test:n_test + n_validation],
              "train": order[n_test + n_validation:]}
    return {split: [units[i] for i in sorted(indices)] for split, indices in chosen.items()}


def write_text(folder: Path, units: dict[str, dict[str, list[Unit]]]) -> None:
    for split, by_source in units.items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        for name, chosen in by_source.items():
            (folder / split / f"{name}.txt").write_text("\n\n".join(u.text for u in chosen) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------- tokenizer

def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_tokenizer(spec: str, train_texts: Iterable[str], save_to: Path):
    """The tokenizer `spec` names, saved to `save_to`. bpe:<n> trains a byte-level BPE of n tokens on
    `train_texts` (the train split only), <|endoftext|> being bos and eos and <|pad|> the padding."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if spec.startswith("bpe:"):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=int(spec[4:]), special_tokens=["<|endoftext|>", "<|pad|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
        bpe.train_from_iterator(train_texts, trainer)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                            eos_token="<|endoftext|>", pad_token="<|pad|>")
    else:
        if spec == "smollm2":
            try:
                from athena.models.hf import smollm2_dir  # imported here: the data side does not need the models
            except ImportError as error:
                raise DatasetError(f"tokenizer: smollm2 needs athena.models.hf.smollm2_dir ({error}); use "
                                   f"tokenizer: bpe:<vocab size> meanwhile") from None
            folder = smollm2_dir()
        else:
            folder = Path(spec)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.eos_token_id is None:
        raise DatasetError(f"tokenizer {spec} has no eos token, which separates documents; use another tokenizer")
    if len(tokenizer) <= 256:
        raise DatasetError(f"tokenizer {spec} has {len(tokenizer)} tokens; -100 labels need a vocabulary over 256")
    tokenizer.save_pretrained(save_to)
    return tokenizer


def encode(tokenizer, texts: list[str], desc: str, batch: int = 1024) -> list[list[int]]:
    out: list[list[int]] = []
    for begin in tqdm(range(0, len(texts), batch), desc=desc, disable=len(texts) <= batch):
        out += tokenizer(texts[begin:begin + batch], add_special_tokens=False, verbose=False)["input_ids"]
    return out


# ----------------------------------------------------------------------------------------------------- splits

def pack_split(root: Path, split: str, tokenizer, units: dict[str, list[Unit]], names: list[str],
               seq_len: int) -> dict:
    """Write `split` as packed language modelling rows; return its token counts."""
    if split == "validation" and not any(units.values()):
        return {"sequences": 0}  # validation fraction 0: no validation split
    eos = tokenizer.eos_token_id
    pieces, tokens_per_source = [], {}
    for name in names:
        ids = encode(tokenizer, [u.text for u in units[name]], f"tokenizing {split} {name}")
        tokens_per_source[name] = sum(len(x) + 1 for x in ids)
        pieces += [np.asarray(x + [eos], dtype=np.int32) for x in ids]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    rows = len(stream) // seq_len
    if rows == 0:
        raise DatasetError(f"the {split} split holds {len(stream)} tokens, less than one sequence of seq_len "
                           f"{seq_len}; raise the held-out fractions, add text, or shorten data.build.seq_len")
    inputs = stream[:rows * seq_len].reshape(rows, seq_len)
    write_split(root, split, _one_per_group(inputs, inputs),
                {"seq_len": seq_len, "vocab_size": len(tokenizer), "pad_id": pad_id(tokenizer),
                 "ignore_label_id": None, "num_puzzle_identifiers": 1})
    # The labels are the inputs: one file on disk under both names (the model shifts them).
    labels = root / split / "all__labels.npy"
    labels.unlink()
    try:
        os.link(root / split / "all__inputs.npy", labels)
    except OSError:  # a filesystem without hard links
        np.save(labels, inputs)
    return {"sequences": rows, "tokens": rows * seq_len, "tail_tokens_dropped": len(stream) - rows * seq_len,
            "tokens_per_source": tokens_per_source}


def sft_examples(tokenizer, items, seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(inputs, labels, number dropped as too long) of prompt + " " + answer + eos examples, right-padded.

    The answer's ids are those lm-eval scores: the tokens of prompt + " " + answer after the first
    len(tokens of prompt), so training and evaluation cut the text at the same token."""
    pad, eos = pad_id(tokenizer), tokenizer.eos_token_id
    prompts = encode(tokenizer, [item.prompt for item in items], "tokenizing prompts")
    wholes = encode(tokenizer, [f"{item.prompt} {item.answer}" for item in items], "tokenizing prompt + answer")
    inputs = np.full((len(items), seq_len), pad, dtype=np.int32)
    labels = np.full((len(items), seq_len), IGNORE_LABEL, dtype=np.int32)
    kept = 0
    for prompt, whole in zip(prompts, wholes):
        ids = whole + [eos]
        if len(ids) > seq_len or len(whole) <= len(prompt):
            continue
        inputs[kept, :len(ids)] = ids
        labels[kept, len(prompt):len(ids)] = ids[len(prompt):]
        kept += 1
    return inputs[:kept], labels[:kept], len(items) - kept


def sft_split(root: Path, split: str, tokenizer, items, seq_len: int) -> dict:
    inputs, labels, dropped = sft_examples(tokenizer, items, seq_len)
    if len(inputs) == 0:
        if split == "validation":
            return {"examples": 0, "dropped_too_long": dropped}
        raise DatasetError(f"the {split} split of the fine-tuning task holds no example that fits in {seq_len} "
                           f"tokens ({dropped} too long); raise data.build.sft_seq_len or the held-out fractions")
    write_split(root, split, _one_per_group(inputs, labels),
                {"seq_len": seq_len, "vocab_size": len(tokenizer), "pad_id": pad_id(tokenizer),
                 "ignore_label_id": IGNORE_LABEL, "num_puzzle_identifiers": 1})
    return {"examples": len(inputs), "answer_tokens": int((labels != IGNORE_LABEL).sum()),
            "dropped_too_long": dropped}


def _one_per_group(inputs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    n = len(inputs)
    return {"inputs": inputs, "labels": labels, "puzzle_identifiers": np.zeros(n, dtype=np.int32),
            "puzzle_indices": np.arange(n + 1, dtype=np.int64), "group_indices": np.arange(n + 1, dtype=np.int64)}
