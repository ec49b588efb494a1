"""Fail when README.md or docs/*.md cite a file that is not in the repository.

    python tools/check_docs.py [ROOT]      # prints one line per broken citation, exits 1 if there is any

A citation is
- a Markdown link or image target that is not a URL or an anchor, resolved from the page's folder;
- a path written in the text (prose, code spans, command blocks) whose first folder is one of the
  repository's top-level folders (`docs/results/x.json`, `bench/adapters.py`), resolved from the root,
  or that starts with `../`, resolved from the page's folder.
A `*` in a path must match at least one file; of a template (`docs/results/x/<date>.json`) the folder must
exist. Git-ignored run folders (outputs/, data/, ...) and hidden
folders (.ref/, .venv/) are not checked: a page may name them as places a command writes to.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PAGES = ("README.md", "docs/*.md")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A path: folders joined by '/', optionally a last part; not preceded by a character that would make it the tail
# of a longer path, a URL, a variable ($OUT/...) or a template (<run>/...).
PATH = re.compile(r"(?<![\w./$<{~-])((?:\.\./)+[\w.*-]+(?:/[\w.*-]*)*|[\w][\w.-]*/(?:[\w.*-]+/?)*)")


def ignored_folders(root: Path) -> set[str]:
    """Top-level folders .gitignore names (`/outputs/`, `data/`): run outputs a page may mention."""
    gitignore = root / ".gitignore"
    names = set()
    for line in gitignore.read_text().splitlines() if gitignore.is_file() else []:
        line = line.strip()
        if line.endswith("/") and "*" not in line and line.strip("/") and "/" not in line.strip("/"):
            names.add(line.strip("/"))
    return names


def exists(root: Path, base: Path, target: str) -> bool:
    path = (base / target).resolve()
    try:
        path.relative_to(root.resolve())
    except ValueError:
        return False  # outside the repository
    if "*" in target:
        return any(p.resolve().is_relative_to(root.resolve()) for p in base.glob(target))
    return path.exists()


def check_page(root: Path, page: Path, folders: set[str]) -> list[str]:
    problems = []
    rel = page.relative_to(root)
    for number, line in enumerate(page.read_text().splitlines(), 1):
        linked = set()
        for match in LINK.finditer(line):
            target = match.group(1).split("#", 1)[0]
            linked.add(match.start(1))
            if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # an anchor or a URL
            if not exists(root, page.parent, target):
                problems.append(f"{rel}:{number}: link to {target}, which is not in the repository")
        for match in PATH.finditer(line):
            if match.start(1) in linked:
                continue
            target = match.group(1).rstrip(".,;:")
            if line[match.end(1):match.end(1) + 1] in ("<", "{"):
                target = target[:target.rfind("/") + 1]  # a template (`runs/<name>.json`): check its folder
            if target.startswith("../"):
                base = page.parent
            elif target.split("/", 1)[0] in folders:
                base = root
            else:
                continue
            if not exists(root, base, target):
                problems.append(f"{rel}:{number}: cites {target}, which is not in the repository")
    return problems


def check(root: Path) -> list[str]:
    """Every broken citation in the root's README.md and docs/*.md, as 'page:line: message'."""
    skip = ignored_folders(root)
    folders = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in skip}
    pages = sorted(p for pattern in PAGES for p in root.glob(pattern))
    return [problem for page in pages for problem in check_page(root, page, folders)]


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    problems = check(root)
    for problem in problems:
        print(problem)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
