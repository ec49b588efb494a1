"""README.md and docs/*.md cite only files that exist in the repository (tools/check_docs.py)."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "check_docs.py"
_spec = importlib.util.spec_from_file_location("check_docs", SCRIPT)
check_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_docs)


def test_docs_cite_only_files_in_the_repository():
    assert check_docs.check(ROOT) == []


def _mini_repo(tmp_path: Path) -> Path:
    """A repository with one record, one script and a page citing both in each way the check reads."""
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "run.json").write_text("{}")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "tool.py").write_text("")
    (tmp_path / "outputs").mkdir()
    (tmp_path / ".gitignore").write_text("/outputs/\n")
    (tmp_path / "README.md").write_text(
        "See [the record](docs/results/run.json) and `python bench/tool.py --out docs/results/run.json`;\n"
        "runs write to `outputs/mine/last.pt`; details at https://example.org/bench/x.py.\n")
    (tmp_path / "docs" / "page.md").write_text(
        "![plot](results/run.json) from `bench/tool.py`, raw: `docs/results/*.json`, next `docs/results/<date>.json`.\n")
    return tmp_path


def test_the_check_reports_each_kind_of_broken_citation(tmp_path):
    root = _mini_repo(tmp_path)
    assert check_docs.check(root) == []  # run outputs (git-ignored) and URLs are not citations
    page = root / "docs" / "page.md"
    page.write_text(page.read_text() + "\n".join([
        "[gone](results/missing.json)",                    # a link, relative to the page
        "![gone](../bench/missing.png)",                   # an image leaving docs/
        "raw: `docs/results/old/run.json`.",               # a path from the root in prose
        "facts in ../shared/ANCHORS.md",                   # outside the repository
        "every `docs/results/*.csv`",                      # a glob matching nothing
        "to `docs/results/old/<date>.json`",               # a template whose folder is missing
    ]) + "\n")
    problems = check_docs.check(root)
    assert [p.split(": ", 1)[0] for p in problems] == [f"docs/page.md:{n}" for n in range(2, 8)]
    for target in ["results/missing.json", "../bench/missing.png", "docs/results/old/run.json",
                   "../shared/ANCHORS.md", "docs/results/*.csv", "cites docs/results/old/,"]:
        assert any(target in p for p in problems), target


def test_the_script_exits_nonzero_on_a_broken_link(tmp_path):
    root = _mini_repo(tmp_path)
    shutil.copytree(ROOT / "tools", root / "tools")
    ok = subprocess.run([sys.executable, str(root / "tools" / "check_docs.py")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout
    (root / "README.md").write_text((root / "README.md").read_text() + "[x](docs/nope.md)\n")
    bad = subprocess.run([sys.executable, str(root / "tools" / "check_docs.py")], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stdout.strip() == "README.md:3: link to docs/nope.md, which is not in the repository"
