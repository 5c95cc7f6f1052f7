"""The documentation: README.md stays a short front door, and every relative link resolves.

A link resolves when its file exists and, for ``file#anchor`` (or ``#anchor`` on the same
page), when the anchor is the GitHub slug of a heading in the target page.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "experiments" / "README.md"]

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose(text: str) -> list[str]:
    """The lines of a markdown page outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _without_code_spans(line: str) -> str:
    return re.sub(r"(`+).*?\1", "", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, punctuation dropped, spaces to '-'."""
    parts = re.split(r"(`+.*?`+)", heading)  # code spans are literal text
    for i, part in enumerate(parts):
        if part.startswith("`"):
            parts[i] = part.strip("`")
            continue
        part = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", part)  # a link keeps its text
        part = re.sub(r"<[^>]+>", "", part)  # inline HTML
        part = part.replace("*", "")
        parts[i] = re.sub(r"(?<!\w)_+|_+(?!\w)", "", part)  # _emphasis_, not snake_case
    text = "".join(parts).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor GitHub gives the headings of ``page`` (repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def relative_links(page: Path) -> list[str]:
    """The targets of every markdown link and image on ``page`` that is not a URL."""
    targets = []
    for line in _prose(page.read_text(encoding="utf-8")):
        for target in LINK.findall(_without_code_spans(line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                continue  # https:, mailto:, ...
            targets.append(target)
    return targets


def broken_links(page: Path) -> list[str]:
    """Each link on ``page`` whose file is missing, or whose anchor names no heading there."""
    broken = []
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        file = (page.parent / path_part).resolve() if path_part else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file}")
    return broken


def test_readme_is_at_most_250_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: move the detail into docs/")


def test_the_pages_exist_and_link_somewhere():
    assert (ROOT / "docs" / "protocol.md").exists()
    assert len(PAGES) > 5, PAGES
    readme_links = relative_links(ROOT / "README.md")
    assert any(t.startswith("docs/") for t in readme_links), "README.md links no page in docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    assert broken_links(page) == [], f"broken links in {page.relative_to(ROOT)}"


def test_every_docs_page_is_reachable_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(ROOT / "README.md")}
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert unlinked == [], f"docs pages the README's table of contents does not name: {unlinked}"


@pytest.mark.parametrize(("heading", "anchor"), [
    ("The node launcher: `snake-flower supernode`", "the-node-launcher-snake-flower-supernode"),
    ("Measured: 20 % failed hops and a node that leaves", "measured-20--failed-hops-and-a-node-that-leaves"),
    ("VGG-11 (the paper's model), short configuration", "vgg-11-the-papers-model-short-configuration"),
    ("Split learning's round trips, and why `--jobs` pays", "split-learnings-round-trips-and-why---jobs-pays"),
    ("`<out>/summary.json`, `report.md` and the plots", "outsummaryjson-reportmd-and-the-plots"),
    ("Fashion-MNIST, three seeds", "fashion-mnist-three-seeds"),
])
def test_slug_follows_github(heading: str, anchor: str):
    assert slug(heading) == anchor


def test_a_broken_link_is_found(tmp_path: Path):
    (tmp_path / "a.md").write_text("# Title\n\n## A section\n\n[ok](#a-section) [ok too](b.md#b)\n"
                                   "[no file](c.md) [no anchor](b.md#nope) [same page](#nope)\n"
                                   "```\n[in code](d.md)\n```\n`[in a span](e.md)` [web](https://x.org/y.md)\n")
    (tmp_path / "b.md").write_text("# B\n")
    found = broken_links(tmp_path / "a.md")
    assert [f.split(":")[0] for f in found] == ["c.md", "b.md#nope", "#nope"]
