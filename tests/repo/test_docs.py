"""The user documentation: a short README, one page per capability, links that resolve, no
paths outside the repository, and docs/benchmarks.md as `lmstack bench report` renders it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import REPO

from lmstack.bench.report import render

ROOT = REPO
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
CAPABILITY_PAGES = [
    "engine",
    "server",
    "docqa",
    "triage",
    "alignment",
    "planning",
    "deployment",
    "architecture",
    "benchmarks",
]
README_LIMIT_BYTES = 8192
# Markdown links and images: [text](target) / ![alt](target), target up to a space or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size < README_LIMIT_BYTES, f"README.md is {size} bytes, limit {README_LIMIT_BYTES}"


def test_readme_keeps_the_two_setup_commands():
    text = README.read_text(encoding="utf-8")
    assert "make serve" in text and "make test" in text


@pytest.mark.parametrize("name", CAPABILITY_PAGES)
def test_each_capability_has_a_page_linked_from_the_readme(name):
    assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing"
    assert f"(docs/{name}.md)" in README.read_text(encoding="utf-8"), f"README lacks docs/{name}.md"


# A relative path that climbs (`../x/...`), anywhere in a page's text, links included.
CLIMB = re.compile(r"(?<![\w.])((?:\.\./)+[\w.-]+)")


def outside_paths(page: Path, text: str) -> list[tuple[int, str]]:
    """(line, path) for each relative path in `text` that resolves outside the repository,
    read from the page's folder or from the repository root (where commands run)."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for path in CLIMB.findall(line):
            bases = (page.parent, ROOT)
            if all(not (base / path).resolve().is_relative_to(ROOT) for base in bases):
                found.append((n, path))
    return found


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_no_page_mentions_folders_outside_the_repository(page):
    text = page.read_text(encoding="utf-8")
    bad = outside_paths(page, text)
    bad += [(n, "/work/") for n, line in enumerate(text.splitlines(), 1) if "/work/" in line]
    assert not bad, f"{_rel(page)} names paths outside the repository: {bad}"


def test_the_outside_path_check_finds_climbing_paths():
    page = DOCS / "engine.md"
    text = "see [README](../README.md)\nread ../../elsewhere/design.md first"
    assert outside_paths(page, text) == [(2, "../../elsewhere")]
    assert outside_paths(README, "from ../sibling/data") == [(1, "../sibling")]


def links(text: str) -> list[str]:
    """Link targets outside fenced code blocks."""
    return LINK.findall(FENCE.sub("", text))


def test_link_parser_finds_relative_links():
    sample = 'See [a](docs/a.md), ![b](img/b.png "t") and [c](https://x.y/).\n```\n[d](no.md)\n```'
    assert links(sample) == ["docs/a.md", "img/b.png", "https://x.y/"]


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_point_to_files_in_the_repository(page):
    broken = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s), mailto: not files; an anchor on the same page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists() or not path.is_relative_to(ROOT):
            broken.append(target)
    assert not broken, f"{_rel(page)} links to missing files: {broken}"


def test_benchmarks_page_is_what_bench_report_renders(monkeypatch):
    # render() names each file as given, so give the paths as the documented command does:
    # `lmstack bench report docs/benchmarks/*.json --out docs/benchmarks.md` from the root.
    monkeypatch.chdir(ROOT)
    files = sorted(Path("docs/benchmarks").glob("*.json"))
    assert files, "no benchmark JSON in docs/benchmarks/"
    page = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    assert render(files) == page, (
        "docs/benchmarks.md is stale: run `.venv/bin/lmstack bench report "
        "docs/benchmarks/*.json --out docs/benchmarks.md`"
    )
    for path in files:  # every run names its date, commit and CPU
        meta = json.loads(path.read_text())["meta"]
        assert f"{meta['date']}, commit {meta['commit']}, `{path}`" in page
        assert f"\n## {meta['cpu']}" in page
