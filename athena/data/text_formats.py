"""Readers and cleaners for the file formats the text corpus comes in (athena.data.text_sources walks the packages).

Binary containers: SWORD compressed modules (zText / zCom), R's lazy-load database (.rdb of XDR serialisations),
dictd indexes. Markup to plain text: OSIS XML, reStructuredText, Perl POD, GCIDE's dictionary markup. Every
cleaner returns paragraphs: stripped strings with no blank line inside.
"""

from __future__ import annotations

import html
import re
import struct
import textwrap
import zlib
from pathlib import Path
from typing import Iterator

from athena.data.format import DatasetError


# ----------------------------------------------------------------------------------------------------- paragraphs

def paragraphs_of(text: str, *, join_lines: bool) -> list[str]:
    """Blank-line separated paragraphs of `text`. `join_lines`: wrapped prose, its lines joined by spaces; else the
    line breaks are kept (verse, code), trailing spaces and common indentation dropped. An indented block (code,
    a quotation) keeps its lines either way."""
    out = []
    for block in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n").replace("\t", "    ")):
        lines = [line.rstrip() for line in block.split("\n") if line.strip()]
        if not lines:
            continue
        indented = all(line[:1] == " " for line in lines)
        if join_lines and not indented:
            out.append(re.sub(r"\s+", " ", " ".join(lines)).strip())
        else:
            out.append(textwrap.dedent("\n".join(lines)).strip("\n"))
    return out


# ----------------------------------------------------------------------------------------------------- SWORD

def sword_blocks(module_dir: Path) -> Iterator[str]:
    """The decompressed text blocks of a SWORD zText/zCom module folder, Old Testament then New.

    Each testament has an index `<ot|nt>.?zs`: little-endian uint32 triples (offset, compressed size, size) into
    `<ot|nt>.?zz`, a run of zlib streams (one per book or chapter, BlockType in the module's .conf)."""
    found = False
    for testament in ("ot", "nt"):
        indexes = sorted(module_dir.glob(f"{testament}.?zs"))
        if not indexes:
            continue
        found = True
        index = indexes[0].read_bytes()
        data = indexes[0].with_suffix(indexes[0].suffix[:-1] + "z").read_bytes()
        if len(index) % 12:
            raise DatasetError(f"{indexes[0]} is not a SWORD block index (size {len(index)} is not a multiple of 12)")
        for offset, compressed, size in struct.iter_unpack("<III", index):
            if compressed == 0:
                continue
            block = zlib.decompress(data[offset:offset + compressed])
            if len(block) != size:
                raise DatasetError(f"{indexes[0]}: block at {offset} unpacks to {len(block)} bytes, index says {size}")
            yield block.decode("utf-8", errors="replace")
    if not found:
        raise DatasetError(f"no SWORD block index (ot.bzs, nt.czs, ...) in {module_dir}")


_OSIS_DROP = re.compile(r"<note\b[^>]*/>|<note\b.*?</note>|<title\b[^>]*/>|<title\b.*?</title>", re.S)
# Paragraph, chapter, division and line-group boundaries (milestones or elements) start a new paragraph.
_OSIS_BREAK = re.compile(r"</?(?:div|p|chapter|lg|list|item|table|row)\b[^>]*>")
_TAG = re.compile(r"<[^>]*>")


def osis_paragraphs(xml: str) -> list[str]:
    """Plain paragraphs of an OSIS XML fragment: notes (footnotes, cross references) and headings dropped, tags
    stripped, entities decoded."""
    text = _OSIS_DROP.sub(" ", xml)
    text = _OSIS_BREAK.sub("\n\n", text)
    text = html.unescape(_TAG.sub("", text))
    return [p for p in paragraphs_of(text, join_lines=True) if re.search(r"\w", p)]


def osis_book(xml: str) -> str | None:
    """The osisID of the first book or chapter a block opens (its title), if any."""
    match = re.search(r'<(?:div|chapter)\b[^>]*osisID="([^"]+)"', xml)
    return match.group(1) if match else None


# ----------------------------------------------------------------------------------------------------- R data

class _XDRReader:
    """Just enough of R's XDR serialisation (format versions 2 and 3) to read character vectors and the lists,
    pairlists and attributes around them."""

    NIL, SYM, LIST, CHAR, LGL, INT, REAL, STR, VEC = 254, 1, 2, 9, 10, 13, 14, 16, 19
    REF, GLOBALENV, EMPTYENV, BASEENV, MISSINGARG = 255, 253, 242, 241, 251

    def __init__(self, data: bytes, where: str):
        self.data, self.pos, self.where = data, 0, where
        self.refs: list = []

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def header(self) -> None:
        if self.data[:2] != b"X\n":
            raise DatasetError(f"{self.where}: not an XDR R serialisation (starts {self.data[:2]!r})")
        self.pos = 2
        version = self.int()
        self.int(), self.int()  # the R versions that wrote it / can read it
        if version == 3:
            length = self.int()
            self.pos += length  # the native encoding's name
        elif version != 2:
            raise DatasetError(f"{self.where}: R serialisation version {version} (only 2 and 3 are read)")

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            high, low = self.int(), self.int()
            n = (high << 32) + (low & 0xFFFFFFFF)
        return n

    def item(self):
        flags = self.int()
        kind, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (self.NIL, self.GLOBALENV, self.EMPTYENV, self.BASEENV, self.MISSINGARG):
            return None
        if kind == self.REF:
            index = levels if levels else self.int()
            return self.refs[index - 1]
        if kind == self.SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == self.CHAR:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self.data[self.pos:self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if levels & 4 else "utf-8", errors="replace")
        if kind == self.LIST:  # pairlist node: [attributes] [tag] car cdr
            attributes = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            head = (tag, self.item())
            rest = self.item()
            del attributes
            return [head] + (rest or [])
        if kind in (self.STR, self.VEC):
            value = [self.item() for _ in range(self.length())]
        elif kind in (self.INT, self.LGL):
            n = self.length()
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == self.REAL:
            n = self.length()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        else:
            raise DatasetError(f"{self.where}: R object type {kind} at byte {self.pos - 4} is not supported "
                               f"(this reader handles character vectors, lists and numbers)")
        if has_attr:
            self.item()
        return value


def rdb_objects(path: Path) -> Iterator[object]:
    """The objects of an R lazy-load database (.rdb), in file order: each is [4-byte big-endian uncompressed
    length][zlib stream of an XDR serialisation]. Character vectors come back as lists of str (None for NA)."""
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        (size,) = struct.unpack_from(">I", data, pos)
        stream = zlib.decompressobj()
        raw = stream.decompress(data[pos + 4:])
        if len(raw) != size or not stream.eof:
            raise DatasetError(f"{path}: object at byte {pos} unpacks to {len(raw)} bytes, its header says {size}")
        reader = _XDRReader(raw, f"{path} (object at byte {pos})")
        pos = len(data) - len(stream.unused_data)
        reader.header()
        value = reader.item()
        if reader.pos != len(raw):  # a misread type or attribute would leave bytes over
            raise DatasetError(f"{reader.where}: {len(raw) - reader.pos} bytes left after the object")
        yield value


# ----------------------------------------------------------------------------------------------------- dictd

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def dictd_number(text: str) -> int:
    """dictd's base-64 numbers in .index files (most significant digit first)."""
    value = 0
    for char in text:
        value = value * 64 + _B64[char]
    return value


def dictd_entries(index_text: str, data: bytes) -> Iterator[tuple[str, str]]:
    """(headword, entry text) of a dictd dictionary, in file order, each stretch of the data file once (several
    headwords may point at one entry); the 00-database-* header entries skipped. Bytes that are not UTF-8 (GCIDE
    has a few cp1252 quotes) are read as cp1252."""
    spans: dict[tuple[int, int], str] = {}
    for line in index_text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or fields[0].startswith("00-database") or fields[0].startswith("00database"):
            continue
        spans.setdefault((dictd_number(fields[1]), dictd_number(fields[2])), fields[0])
    end = 0
    for (offset, length), headword in sorted(spans.items()):
        if offset < end:  # inside the entry just read
            continue
        end = offset + length
        raw = data[offset:end]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("cp1252", errors="replace")
        yield headword, text


_GCIDE_SYMBOLS = {"deg": "°", "min": "′", "sec": "″", "frac12": "1/2", "frac13": "1/3", "frac14": "1/4",
                  "frac34": "3/4", "root": "√", "sect": "§", "pound": "£", "cent": "¢", "ae": "ae", "oe": "oe"}


def gcide_paragraphs(entry: str) -> list[str]:
    """Plain paragraphs of a GCIDE entry: senses taken from WordNet dropped (WordNet is a source of its own, with
    held-out glosses), pronunciations, etymologies and source tags removed, accent codes reduced to the letter."""
    senses = [block for block in re.split(r"\n[ \t]*\n", entry) if "WordNet" not in "".join(re.findall(
        r"\[[^\[\]]*\]\s*$", block.strip()))]
    text = "\n\n".join(senses)
    text = re.sub(r"\\[^\\\n]*\\", "", text)  # \Ca*lor"ic\ pronunciation
    text = re.sub(r"\(([^()\n]*\*[^()\n]*)\)", "", text)  # (k[.a]*l[o^]r...) respelling
    text = re.sub(r"\[([^\[\]\s]{1,6})\]", lambda m: _GCIDE_SYMBOLS.get(m.group(1), re.sub(r"[^A-Za-z]", "", m.group(1))),
                  text)
    while True:  # etymologies and [1913 Webster] tags, innermost first
        text, count = re.subn(r"\[[^\[\]]*\]", "", text)
        if not count:
            break
    text = text.replace("{", "").replace("}", "").replace("--", "—")
    return [re.sub(r"\s+([,.;:])", r"\1", p) for p in paragraphs_of(text, join_lines=True)
            if re.search(r"[A-Za-z]{2}", p)]


# ----------------------------------------------------------------------------------------------------- reST, POD

_RST_DROP_BLOCK = {"toctree", "index", "kernel-doc", "include", "literalinclude", "image", "figure", "raw",
                   "tabularcolumns", "highlight", "sectionauthor", "moduleauthor", "only", "contents", "csv-table",
                   "productionlist", "testsetup", "testcleanup", "audit-event", "impl-detail", "c:namespace",
                   "cpp:namespace", "default-domain", "currentmodule", "program", "kernel-abi", "kernel-feat",
                   "maintainers-include", "kernel-include", "sidebar", "graphviz", "code-block-caption"}
_RST_KEEP_ARGS = re.compile(r"(?:^|:)(?:function|method|class|exception|data|attribute|decorator|classmethod|"
                            r"staticmethod|coroutinefunction|coroutinemethod|module|describe|option|cmdoption|"
                            r"envvar|opcode|macro|type|member|var|struct|enum|enumerator|var|pdbcommand|"
                            r"abstractmethod|property)$")


def rst_paragraphs(text: str) -> list[str]:
    """Plain paragraphs of a reStructuredText document: roles reduced to their text, title underlines, targets,
    comments and directive options dropped; the content of directives kept (notes, code), except for directives
    that only point elsewhere (toctree, kernel-doc, images, ...)."""
    out_lines: list[str] = []
    skip_indent: int | None = None  # dropping the indented body of a directive
    for line in text.replace("\t", "    ").split("\n"):
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = None
        stripped = line.strip()
        directive = re.match(r"\.\.\s+([\w:.-]+)::\s*(.*)$", stripped)
        if directive:
            name, args = directive.groups()
            if name in _RST_DROP_BLOCK:
                skip_indent = indent
            elif args and _RST_KEEP_ARGS.search(name):
                out_lines += ["", " " * indent + args, ""]
            else:
                out_lines.append("")
            continue
        if stripped.startswith(".. ") or stripped == "..":  # comment or hyperlink target
            skip_indent = indent
            continue
        if re.fullmatch(r"([=\-~^\"'`#*+_.:<>])\1{2,}", stripped):  # title over/underline, transition
            out_lines.append("")
            continue
        if re.match(r":[\w-]+:(\s|$)", stripped) and out_lines and not out_lines[-1].strip():
            continue  # directive option right after a directive
        out_lines.append(line)
    text = "\n".join(out_lines)
    text = re.sub(r":(rfc|pep):`(\d+)[^`]*`", lambda m: f"{m.group(1).upper()} {m.group(2)}", text)
    text = re.sub(r":[\w:+-]+:`([^`<]*?)\s*<[^`>]*>`", r"\1", text)  # :ref:`title <target>`
    text = re.sub(r":[\w:+-]+:`[~!.]?([^`]*)`", r"\1", text)  # :func:`~os.path.join`
    text = re.sub(r"`([^`<]+?)\s*<[^`>]*>`_{1,2}", r"\1", text)  # `link text <url>`_
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"`([^`]+)`_{0,2}", r"\1", text)
    text = re.sub(r"\s?\[#?[\w-]*\]_", "", text)  # footnote references
    text = re.sub(r"\*\*([^*\n]+)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*\n]*?)\*(?![\w*])", r"\1", text)
    text = re.sub(r"(?<=\w)::$", ":", text, flags=re.M)
    text = re.sub(r"^\s*::$", "", text, flags=re.M)
    return [p for p in paragraphs_of(text, join_lines=True) if re.search(r"[A-Za-z]{2}", p)]


def _pod_escape(name: str) -> str:
    named = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}
    if name in named:
        return named[name]
    if name.isdigit() or name.startswith(("0x", "0X")):
        return chr(int(name, 0) if name.startswith(("0x", "0X")) else int(name))
    return html.unescape(f"&{name};")


def _pod_codes(text: str) -> str:
    # C<< a <=> b >>: the doubled-bracket form, whose body may hold single < and >.
    text = re.sub(r"[A-Z](<{2,})\s(.*?)\s(>{2,})", lambda m: m.group(2) if len(m.group(1)) == len(m.group(3))
                  else m.group(0), text, flags=re.S)
    while True:  # innermost single-bracket codes first
        new = re.sub(r"([A-Z])<([^<>]*)>", _pod_code, text)
        if new == text:
            return new
        text = new


def _pod_code(match: re.Match) -> str:
    code, body = match.groups()
    if code in "XZ":  # index entries, zero-width
        return ""
    if code == "E":
        return _pod_escape(body)
    if code == "L":  # L<text|target>, L<name/"section">, L<url>
        body = body.split("|", 1)[0] if "|" in body else body
        return body.replace('/"', " ").replace('"', "").strip("/ ")
    return body


def pod_paragraphs(text: str) -> list[str]:
    """Plain paragraphs of a Perl POD document: headings and items kept as paragraphs, formatting codes reduced to
    their text, =begin/=end and =for blocks and other commands dropped, verbatim (indented) code kept."""
    out: list[str] = []
    in_pod, skipping = True, None
    for block in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        if not block.strip():
            continue
        command = re.match(r"=(\w+)\s*(.*)", block.strip(), flags=re.S)
        if skipping is not None:
            if command and command.group(1) == "end" and command.group(2).split()[:1] == [skipping]:
                skipping = None
            continue
        if command:
            name, rest = command.groups()
            in_pod = name != "cut"
            if name == "begin":
                skipping = rest.split()[0] if rest.split() else ""
            elif name in ("head1", "head2", "head3", "head4", "item") and rest.strip() not in ("", "*", "•"):
                out.extend(paragraphs_of(_pod_codes(rest), join_lines=True))
            continue
        if in_pod:
            verbatim = block.lstrip("\n")[:1] in (" ", "\t")
            out.extend(paragraphs_of(block if verbatim else _pod_codes(block), join_lines=True))
    return [p for p in out if re.search(r"[A-Za-z]{2}", p)]
