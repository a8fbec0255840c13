"""The README and docs/: the README stays a short newcomer's path, and every relative link in them
resolves, to a file and, for `#anchor` links into Markdown, to a heading (GitHub's slug rules).
Pure text checks: no network, no robench import."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text):
    """(line number, line) for the lines outside fenced code blocks."""
    inside = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield number, line


def slug(heading):
    """GitHub's anchor for a heading: its text, lowercased, punctuation other than '-' and '_'
    dropped, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).lower()                  # inline HTML
    text = re.sub(r"[^\w\- ]", "", text)                         # \w keeps letters, digits, '_'
    return text.replace(" ", "-")


def anchors(path):
    seen, out = {}, set()
    for _, line in prose_lines(path.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path):
    for number, line in prose_lines(path.read_text()):
        line = re.sub(r"`[^`]*`", lambda m: " " * len(m.group(0)), line)   # a code span is not a link
        for pattern in (LINK, IMAGE):
            for m in pattern.finditer(line):
                yield number, m.group(1)


def is_external(target):
    return re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) is not None


def test_slug_follows_githubs_rules():
    assert slug("Does RLFAT narrow the robust generalization gap?") == "does-rlfat-narrow-the-robust-generalization-gap"
    assert slug("Per-dataset defaults (`robench/config.py`, one table)") == "per-dataset-defaults-robenchconfigpy-one-table"
    assert slug("The paper's comparison at CPU scale: 2,500 steps") == "the-papers-comparison-at-cpu-scale-2500-steps"
    assert slug("1. Pipeline and plugins") == "1-pipeline-and-plugins"
    assert slug("snake_case and Ünïcode") == "snake_case-and-ünïcode"


def test_readme_is_a_short_path():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; at most {MAX_README_LINES}: move the rest to docs/"


def broken_links(page):
    broken = []
    for number, target in links(page):
        if is_external(target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"line {number}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"line {number}: {target} (no heading #{anchor} in {dest.name})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_the_checker_finds_what_is_broken(tmp_path):
    (tmp_path / "b.md").write_text("# B\n\n## A heading, with `code`\n\n```\n# not a heading\n```\n")
    (tmp_path / "a.md").write_text(
        "[ok](b.md) [ok](b.md#a-heading-with-code) [ok](#top) [ok](https://example.org/x.md)\n"
        "[bad](missing.md) [bad](b.md#not-a-heading) `[not a link](missing.md)`\n"
        "```\n[not a link](missing.md)\n```\n# Top\n")
    assert [b.split(" (")[0] for b in broken_links(tmp_path / "a.md")] == [
        "line 2: missing.md", "line 2: b.md#not-a-heading"]


def test_the_links_are_found():
    """The checker is not vacuous: it sees the README's links, including those with anchors."""
    targets = [t for _, t in links(README)]
    assert "docs/design.md" in " ".join(targets)
    assert any("#" in t and not is_external(t) for t in targets)


def test_no_page_cites_the_missing_design_md():
    for page in PAGES:
        assert "DESIGN.md" not in page.read_text(), f"{page.relative_to(ROOT)} cites DESIGN.md; the design notes are docs/design.md"
