"""The docs hold together: every relative link in the project's Markdown leads somewhere.

README.md is the front page and docs/ holds the reference, so a section that moves, or a heading
that is renamed, breaks links in other files without anyone seeing it. This test follows every
relative link `[text](target)` (and every image and reference definition) to its file and, where
it names one, to its `#anchor`, the way GitHub makes anchors from headings. Links inside fenced
code blocks and inline code are not links, and http(s), mailto and other URLs are left alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKDOWN = [
    README,
    *sorted((ROOT / "docs").rglob("*.md")),
    *sorted((ROOT / "examples").rglob("*.md")),
    *sorted((ROOT / "tests" / "data").rglob("*.md")),
]
# the front page stays a front page: the reference lives in docs/
README_MAX_LINES = 350

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) or ![alt](target), with an optional "title"; the text may hold one level of [ ]
LINK = re.compile(r"\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
HTML_ANCHOR = re.compile(r"<a\s[^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def prose(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks; inline code keeps its text, not its
    brackets, so it holds no link."""
    lines, fence = [], ""
    for number, line in enumerate(text.splitlines(), 1):
        opened = FENCE.match(line)
        if fence:
            # a fence closes with its own character, at least as many times, and nothing after
            mark = line.strip()
            if opened and set(mark) == {fence[0]} and len(mark) >= len(fence):
                fence = ""
            continue
        if opened:
            fence = opened.group(1)
            continue
        # a heading's slug keeps the text of its code, and drops brackets anyway
        code_text = CODE_SPAN.sub(lambda m: re.sub(r"[\[\]]", "", m.group(2)), line)
        lines.append((number, code_text))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lowercased, punctuation but - and _ dropped,
    each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML shows nothing
    text = text.replace("`", "").replace("*", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a Markdown file defines: its headings' slugs (a repeated one gets -1, -2,
    ... as on GitHub) and its explicit <a id> and <a name> anchors."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    lines = [line for _, line in prose(text)]
    for line in lines:
        heading = HEADING.match(line)
        if heading:
            base = name = slug(heading.group(2))
            while name in seen:
                seen[base] += 1
                name = f"{base}-{seen[base]}"
            seen[name] = 0
            found.add(name)
    found.update(HTML_ANCHOR.findall("\n".join(lines)))
    return found


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link in text that is not inside code."""
    found = []
    for number, line in prose(text):
        found += [(number, m.group(2)) for m in LINK.finditer(line)]
        definition = DEFINITION.match(line)
        if definition:
            found.append((number, definition.group(1)))
    return found


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """One line per relative link in path that names a missing file or a missing anchor."""
    problems = []
    cache: dict[Path, set[str]] = {}
    for number, target in links(path.read_text(encoding="utf-8")):
        if not target or SCHEME.match(target):
            continue  # a URL (http, https, mailto, ...) is not ours to check
        where = f"{path.relative_to(root)}:{number}: {target}"
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part)
        if not file_part:
            linked = path
        elif file_part.startswith("/"):
            linked = root / file_part.lstrip("/")  # GitHub reads /x as the repository's x
        else:
            linked = path.parent / file_part
        if not linked.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor and linked.suffix == ".md":
            if linked not in cache:
                cache[linked] = anchors(linked.read_text(encoding="utf-8"))
            if unquote(anchor) not in cache[linked]:
                problems.append(f"{where}: no anchor #{anchor} in {linked.name}")
    return problems


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    assert broken_links(path) == []


def test_every_docs_page_is_reached_from_the_readme() -> None:
    # through the front page's links, or the links of a page reached that way: no orphan page
    pages = {p for p in MARKDOWN if ROOT / "docs" in p.parents}
    assert pages, "no page found under docs/"
    reached, todo = set(), [README]
    while todo:
        page = todo.pop()
        for _, target in links(page.read_text(encoding="utf-8")):
            file_part = target.partition("#")[0]
            if file_part.endswith(".md") and not SCHEME.match(target):
                linked = (page.parent / file_part).resolve()
                if linked not in reached and linked.exists():
                    reached.add(linked)
                    todo.append(linked)
    assert sorted(str(p.relative_to(ROOT)) for p in pages - reached) == []


def test_readme_is_a_front_page() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    # a newcomer's two commands, in a code block as they are typed; CI runs `make test`
    commands = set()
    fence = ""
    for line in text.splitlines():
        if FENCE.match(line):
            fence = "" if fence else line
        elif fence.strip() in ("```bash", "```sh", "```console"):
            commands.add(line.strip().removeprefix("$ "))
    assert {"make demo", "make test"} <= commands


# The checker itself: it must be able to fail, and follow GitHub's rules where they bite.


def test_a_broken_link_is_caught(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## The `study` section\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/page.md#the-study-section) [ok](#top-of-it)\n"
        "# Top of it\n"
        "[gone](docs/missing.md) [no anchor](docs/page.md#the-study) [self](#nowhere)\n"
        "```bash\n[in a fence](nothing.md)\n```\n"
        "`[inline code](nothing.md)` [web](https://example.com/x.md) [mail](mailto:a@b.c)\n"
        "[ref]: docs/absent.md\n"
    )
    assert broken_links(readme, tmp_path) == [
        "README.md:3: docs/missing.md: no such file",
        "README.md:3: docs/page.md#the-study: no anchor #the-study in page.md",
        "README.md:3: #nowhere: no anchor #nowhere in README.md",
        "README.md:8: docs/absent.md: no such file",
    ]


def test_anchors_follow_githubs_slugs() -> None:
    text = (
        "# `best_model.py`\n"
        "## `figures/` and `report.html`\n"
        "### Without Docker: a SLURM array job\n"
        "## Overrides\n"
        "## Overrides\n"
        "## Overrides ##\n"
        "## The [pruner](x.md), again\n"
        "## `blocks[1].rate` in [0, 1)\n"
        '<a id="kept-by-hand"></a>\n'
        '<a name="old-name"></a>\n'
        "```\n# not a heading\n```\n"
    )
    assert anchors(text) == {
        "best_modelpy",
        "figures-and-reporthtml",
        "without-docker-a-slurm-array-job",
        "overrides",
        "overrides-1",
        "overrides-2",
        "the-pruner-again",
        "blocks1rate-in-0-1",
        "kept-by-hand",
        "old-name",
    }
