"""Labelled tasks made from the corpus, for lm-evaluation-harness and supervised fine-tuning.

Every item of a task comes from a unit (a passage, a fortune, a synset, a docstring) of one split of the corpus, and
keeps that split: a task's test items are held-out text a model trained on the train split never saw. Each task is
written as <data dir>/tasks/<name>{.train,.validation,}.jsonl (the plain .jsonl is the test set) and a local
lm-eval task config <data dir>/tasks/<name>.yaml whose data_files are absolute paths.

  fortune_topics     a fortune -> its topic file (multiple choice over the chosen topics)
  wordnet_gloss      a WordNet definition -> its word (4-way multiple choice, distractors of the same part of speech)
  wordnet_category   a noun or verb and its definition -> its lexicographer file (animal, artifact, motion, ...)
  docstring_name     a standard-library docstring's summary -> the object's name (4-way multiple choice)
  source_id          a passage -> which source it comes from (multiple choice over the sources in the mix)
  text_cloze         a LAMBADA-style last word of a prose paragraph whose last word appears earlier in it
  heldout_text       held-out passages scored by rolling log-likelihood (perplexity)
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable

import numpy as np
import yaml

from athena.data.format import DatasetError

SPLITS = ("train", "validation", "test")
TASK_FILE_SUFFIX = {"train": ".train.jsonl", "validation": ".validation.jsonl", "test": ".jsonl"}


@dataclass
class Unit:
    """A piece of one source's text that goes wholly into one split: a short document, or consecutive paragraphs
    of a long one (`part` counts the pieces of a document)."""
    source: str
    document: int
    part: int
    paragraphs: list[str]
    meta: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "\n\n".join(self.paragraphs)


@dataclass
class TaskItem:
    prompt: str
    answer: str  # what follows the prompt after one space (choices[label] for multiple choice)
    choices: list[str] | None = None
    label: int | None = None
    info: dict = field(default_factory=dict)

    def record(self) -> dict:
        out = {"prompt": self.prompt, "answer": self.answer}
        if self.choices is not None:
            out.update(choices=self.choices, label=self.label)
        return out | self.info


@dataclass(frozen=True)
class TaskSpec:
    name: str
    output_type: str  # multiple_choice | loglikelihood | loglikelihood_rolling
    sources: Callable[[list[str], dict], list[str]]  # the sources it reads from those in the mix ([] = not possible)
    make: Callable[..., list[TaskItem]]  # (units of one split by source, rng, options) -> items
    description: str


def _rng(seed: int, *keys: str) -> np.random.Generator:
    return np.random.default_rng([seed] + [zlib.crc32(key.encode()) for key in keys])


def _sample(items: list, count: int | None, rng: np.random.Generator) -> list:
    """Up to `count` of `items`, drawn without replacement, in their original order."""
    if count is None or len(items) <= count:
        return items
    return [items[i] for i in sorted(rng.choice(len(items), size=count, replace=False))]


def _words(text: str) -> str:
    """Lower-cased words of `text` between single spaces, padded with spaces: ` {phrase} ` in it is a whole-word
    match (a regex per word would recompile for each of WordNet's 150k words)."""
    return " " + " ".join(re.findall(r"\w+", text.lower())) + " "


def _mentions(text: str, word: str) -> bool:
    return _words(word) in _words(text)


def _first_parts(units: dict[str, list[Unit]], source: str) -> list[Unit]:
    return [u for u in units.get(source, []) if u.part == 0]


# ----------------------------------------------------------------------------------------------------- tasks

def topic_label(topic: str) -> str:
    return topic.replace("men-women", "men and women").replace("songs-poems", "songs and poems").replace("-", " ")


def fortune_topic_items(units, rng, options) -> list[TaskItem]:
    topics = options["fortune_topics"]
    choices = [topic_label(t) for t in topics]
    items = []
    for unit in _first_parts(units, "fortunes"):
        if unit.meta["topic"] in topics and len(unit.text) <= options["max_prompt_chars"]:
            label = topics.index(unit.meta["topic"])
            items.append(TaskItem(f"Fortune:\n{unit.text}\nTopic:", choices[label], choices, label,
                                  {"topic": unit.meta["topic"]}))
    return items


def _definition_items(entries: list[tuple[str, str, Hashable, set[str]]], pool: dict[Hashable, list[str]], question: tuple[str, str],
                      rng: np.random.Generator) -> list[TaskItem]:
    """(answer, definition, group, names to avoid) -> 4-way multiple choice with three distractors of the same
    group (part of speech, kind of object) drawn from `pool`."""
    items = []
    for answer, definition, group, avoid in entries:
        candidates = pool[group]
        distractors: list[str] = []
        for _ in range(50):  # rejection sampling: the pools hold thousands of names
            pick = candidates[rng.integers(len(candidates))]
            if pick.lower() not in avoid and pick not in distractors:
                distractors.append(pick)
            if len(distractors) == 3:
                break
        if len(distractors) < 3:
            continue
        choices = [answer] + distractors
        order = rng.permutation(4)
        choices = [choices[i] for i in order]
        items.append(TaskItem(f"{question[0]}: {definition}\n{question[1]}:", answer, choices,
                              int(np.argmax(order == 0))))
    return items


def wordnet_gloss_items(units, rng, options) -> list[TaskItem]:
    pool: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for unit in options["all_units"].get("wordnet", []):
        word = unit.meta["words"][0]  # distractors of the same case: a capital would give a proper noun away
        pool.setdefault((unit.meta["pos"], word[:1].isupper()), []).append(word)
        counts[unit.meta["definition"]] = counts.get(unit.meta["definition"], 0) + 1
    entries = []
    for unit in _first_parts(units, "wordnet"):
        words, definition = unit.meta["words"], unit.meta["definition"]
        spoken = _words(definition)
        if (len(definition.split()) >= 3 and counts[definition] == 1  # one right answer
                and not any(_words(w) in spoken for w in words)):
            entries.append((words[0], definition, (unit.meta["pos"], words[0][:1].isupper()),
                            {w.lower() for w in words}))
    return _definition_items(entries, pool, ("Definition", "Word"), rng)


def wordnet_category_items(units, rng, options) -> list[TaskItem]:
    from athena.data.text_sources import WORDNET_LEXNAMES

    categories = {pos: [n.split(".")[1] for n in WORDNET_LEXNAMES if n.startswith(pos + ".") and n != "noun.Tops"]
                  for pos in ("noun", "verb")}
    items = []
    for unit in _first_parts(units, "wordnet"):
        pos, lexname = unit.meta["pos"], unit.meta["lexname"]
        if pos in categories and lexname != "noun.Tops":
            choices = categories[pos]
            label = choices.index(lexname.split(".")[1])
            items.append(TaskItem(f"Word: {unit.meta['words'][0]}\nDefinition: {unit.meta['definition']}\n"
                                  f"Category of this {pos}:", choices[label], choices, label))
    return items


def docstring_name_items(units, rng, options) -> list[TaskItem]:
    pool: dict[str, list[str]] = {}
    for unit in options["all_units"].get("python_stdlib", []):
        if unit.part == 0:
            pool.setdefault(unit.meta["kind"], []).append(unit.meta["name"])
    counts: dict[str, int] = {}
    for unit in options["all_units"].get("python_stdlib", []):
        counts[unit.meta["summary"]] = counts.get(unit.meta["summary"], 0) + (unit.part == 0)
    entries = []
    for unit in _first_parts(units, "python_stdlib"):
        name, summary = unit.meta["name"], unit.meta["summary"]
        if counts[summary] > 1:
            continue  # "Return self==value." documents many objects: no one right answer
        short = name.rsplit(".", 1)[-1]
        if (unit.meta["kind"] != "module" and 3 <= len(summary.split()) and len(summary) <= options["max_prompt_chars"]
                and not _mentions(summary, short)):
            avoid = {n.lower() for n in pool[unit.meta["kind"]] if n.rsplit(".", 1)[-1] == short}
            entries.append((name, summary, unit.meta["kind"], avoid))
    return _definition_items(entries, pool, ("Docstring", "Name"), rng)


def _balanced(items: list, names: list[str], rng: np.random.Generator, options: dict) -> list:
    """A source's share of a capped split, so that large sources do not crowd out small ones."""
    cap = options["cap"]
    return _sample(items, None if cap is None else max(1, cap // len(names)), rng)


def _passage(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    return cut[:cut.rfind(" ")] if " " in cut else cut


def source_id_items(units, rng, options) -> list[TaskItem]:
    names = options["source_names"]
    choices = [options["source_titles"][n] for n in names]
    items = []
    for label, name in enumerate(names):
        for unit in _balanced(units.get(name, []), names, rng, options):
            items.append(TaskItem(f"Passage:\n{_passage(unit.text, options['passage_chars'])}\nSource:",
                                  choices[label], choices, label, {"source": name}))
    return items


_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{2,})[.,;:!?\"'’”)\]]*$", re.S)


def text_cloze_items(units, rng, options) -> list[TaskItem]:
    items = []
    for name in options["cloze_sources"]:
        found = []
        for unit in units.get(name, []):
            for i, paragraph in enumerate(unit.paragraphs):
                match = _LAST_WORD.match(paragraph)
                if not match:
                    continue
                context = "\n\n".join(unit.paragraphs[:i] + [match.group(1)])
                if len(context) > options["cloze_context_chars"]:  # the end of it, from a word boundary
                    context = context[-options["cloze_context_chars"]:].split(" ", 1)[-1]
                if len(context.split()) >= options["cloze_min_words"] and _mentions(context, match.group(2)):
                    found.append(TaskItem(context, match.group(2), info={"source": name}))
        items += _balanced(found, options["cloze_sources"], rng, options)
    return items


def heldout_text_items(units, rng, options) -> list[TaskItem]:
    names = options["source_names"]
    return [TaskItem("", unit.text, info={"source": name}) for name in names
            for unit in _balanced(units.get(name, []), names, rng, options)]


def _one_source(source: str) -> Callable[[list[str], dict], list[str]]:
    return lambda names, options: [source] if source in names else []


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("fortune_topics", "multiple_choice", _one_source("fortunes"), fortune_topic_items,
             "the topic file of a fortune (Debian fortunes)"),
    TaskSpec("wordnet_gloss", "multiple_choice", _one_source("wordnet"), wordnet_gloss_items,
             "the word a WordNet definition defines, 4-way"),
    TaskSpec("wordnet_category", "multiple_choice", _one_source("wordnet"), wordnet_category_items,
             "the lexicographer file (semantic category) of a WordNet noun or verb"),
    TaskSpec("docstring_name", "multiple_choice", _one_source("python_stdlib"), docstring_name_items,
             "the standard-library object a docstring summary documents, 4-way"),
    TaskSpec("source_id", "multiple_choice", lambda names, options: names if len(names) > 1 else [],
             source_id_items, "which source of the corpus a passage comes from"),
    TaskSpec("text_cloze", "loglikelihood", lambda names, options: options["cloze_sources"], text_cloze_items,
             "the last word of a held-out prose paragraph that names it earlier (LAMBADA-style)"),
    TaskSpec("heldout_text", "loglikelihood_rolling", lambda names, options: names, heldout_text_items,
             "rolling log-likelihood of held-out passages (word/byte perplexity)"),
)}


def make_task(spec: TaskSpec, units: dict[str, dict[str, list[Unit]]], options: dict, *, seed: int,
              train_items: int | None, eval_items: int | None) -> dict[str, list[TaskItem]]:
    """A task's items per split, each split drawn from the same split of the corpus, capped (a seeded sample)."""
    out = {}
    for split in SPLITS:
        if spec.output_type == "loglikelihood_rolling" and split == "train":
            continue  # the train split of the corpus is the training text itself
        cap = train_items if split == "train" else eval_items
        items = spec.make(units[split], _rng(seed, spec.name, split), options | {"cap": cap})
        out[split] = _sample(items, cap, _rng(seed, spec.name, split, "cap"))
    if not out["test"]:
        raise DatasetError(f"task {spec.name} has no test items from this corpus; raise the test fraction of its "
                           f"sources or leave it out of data.build.tasks")
    return out


# ----------------------------------------------------------------------------------------------------- files

METRICS = {
    "multiple_choice": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    "loglikelihood": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                      {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    "loglikelihood_rolling": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                              {"metric": "bits_per_byte"}],
}


def task_config(spec: TaskSpec, files: dict[str, Path]) -> dict:
    """A local lm-eval (0.4) task: the JSONL files through the `json` dataset builder, fields named in the YAML."""
    config = {
        "task": spec.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {split: str(path.resolve()) for split, path in files.items()}},
        "test_split": "test",
        "output_type": spec.output_type,
        "metric_list": METRICS[spec.output_type],
        "metadata": {"version": 1.0, "description": spec.description},
    }
    if "validation" in files:
        config["validation_split"] = "validation"
    if "train" in files:
        config["training_split"] = "train"
        config["fewshot_split"] = "train"
    if spec.output_type == "loglikelihood_rolling":
        config.update(doc_to_text="", doc_to_target="answer")
    else:
        config.update(doc_to_text="prompt", doc_to_target="label" if spec.output_type == "multiple_choice"
                      else "answer", target_delimiter=" ")
        if spec.output_type == "multiple_choice":
            config["doc_to_choice"] = "choices"
    return config


def write_task(tasks_dir: Path, final_tasks_dir: Path, spec: TaskSpec, items: dict[str, list[TaskItem]]) -> None:
    """<name>{.train,.validation,}.jsonl and <name>.yaml, whose data_files name the files where they will be
    once the build is moved into place (`final_tasks_dir`)."""
    tasks_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, split_items in items.items():
        path = tasks_dir / f"{spec.name}{TASK_FILE_SUFFIX[split]}"
        with open(path, "w", encoding="utf-8") as handle:
            for item in split_items:
                handle.write(json.dumps(item.record(), ensure_ascii=False) + "\n")
        if split_items:
            files[split] = final_tasks_dir / path.name
    (tasks_dir / f"{spec.name}.yaml").write_text(yaml.safe_dump(task_config(spec, files), sort_keys=False))


def refresh_task_configs(data_dir: str | Path) -> Path:
    """<data_dir>/tasks with every task config's data_files pointing into it: rewrites the configs of a dataset
    folder that was moved or copied since it was built (their paths are absolute). Returns the tasks folder."""
    tasks_dir = Path(data_dir).resolve() / "tasks"
    for path in sorted(tasks_dir.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        files = config["dataset_kwargs"]["data_files"]
        moved = {split: str(tasks_dir / Path(file).name) for split, file in files.items()}
        if moved != files:
            config["dataset_kwargs"]["data_files"] = moved
            path.write_text(yaml.safe_dump(config, sort_keys=False))
    return tasks_dir
