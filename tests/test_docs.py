"""The documentation: the MkDocs site builds with --strict, and every relative link in the markdown resolves.

MkDocs checks the links between the pages of ``docs/`` itself (``validation:`` in ``mkdocs.yml`` turns broken
pages, anchors and absolute links into warnings, and ``strict: true`` into failures). The README is not part of
the site, so its links are checked here: a file link must name an existing file, an ``#anchor`` a heading of the
target. The same check runs over ``docs/`` with GitHub's heading slugs, since the README's links lead readers to
those pages on GitHub as well.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose_lines(text: str) -> list[str]:
    """Return the lines outside fenced code blocks (a heading or a link inside a fence is neither)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """Return the anchor GitHub gives a heading: the rendered text, lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays, its target goes
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Return the anchors of a markdown file's headings, numbering repeats as GitHub does (-1, -2, ...)."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match is None:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path) -> list[str]:
    """Return the targets of a markdown file's inline links and images, outside code blocks and code spans."""
    targets: list[str] = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        targets.extend(match.group(1) for match in LINK.finditer(CODE_SPAN.sub("", line)))
    return targets


def broken_links(path: Path) -> list[str]:
    """Return each relative link of ``path`` that names a missing file or a heading its target lacks."""
    broken: list[str] = []
    for target in links(path):
        if EXTERNAL.match(target) or target.startswith("//"):
            continue  # http(s), mailto: not checked here (no network)
        file_part, _, anchor = target.partition("#")
        if file_part.startswith("/"):
            broken.append(f"{target}: absolute path")
            continue
        resolved = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved}")
        elif anchor and (resolved.suffix != ".md" or unquote(anchor).lower() not in anchors(resolved)):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    return broken


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=config.parent, capture_output=True, text=True, timeout=300, check=False)


def test_site_builds_strict(tmp_path: Path) -> None:
    result = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    pages = sorted(page.stem for page in DOCS.glob("*.md"))
    for stem in pages:
        built = tmp_path / "site" / ("index.html" if stem == "index" else f"{stem}/index.html")
        assert built.is_file(), f"docs/{stem}.md was not built"


@pytest.mark.parametrize("bad_link", ["[gone](no-such-page.md)", "[gone](registry.md#no-such-heading)",
                                      "[gone](/registry.md)"])
def test_strict_build_fails_on_a_broken_link(tmp_path: Path, bad_link: str) -> None:
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs")
    index = tmp_path / "docs" / "index.md"
    index.write_text(index.read_text(encoding="utf-8") + f"\nSee {bad_link}.\n", encoding="utf-8")
    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Aborted with 1 warnings in strict mode" in output and "Doc file 'index.md'" in output, output


@pytest.mark.parametrize("path", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_link_check_finds_missing_files_and_anchors(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## `quantgate advise`: the cheapest one\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Title\n\n## Two words\n\n"
        "[ok](docs/page.md) [ok](docs/page.md#quantgate-advise-the-cheapest-one) [ok](#two-words)\n"
        "[bad](docs/gone.md) [bad](docs/page.md#nowhere) [bad](#three-words) [bad](/abs.md)\n"
        "`[not a link](docs/gone.md)` [web](https://example.com/x)\n"
        "```\n[not a link](docs/gone.md)\n# not a heading\n```\n")
    assert [entry.split(":")[0] for entry in broken_links(readme)] == [
        "docs/gone.md", "docs/page.md#nowhere", "#three-words", "/abs.md"]


def test_readme_keeps_the_two_commands_and_links_every_page() -> None:
    text = README.read_text(encoding="utf-8")
    assert "| set up and gate the bundled registry | `make gate` |" in text
    assert "| set up and run the test suite | `make test` |" in text
    linked = {target.partition("#")[0] for target in links(README)}
    for page in sorted(DOCS.glob("*.md")):
        assert f"docs/{page.name}" in linked, f"README's Documentation list does not link docs/{page.name}"


def test_module_table_lives_in_one_place() -> None:
    holders = [path.name for path in [README, *DOCS.glob("*.md")]
               if "| module | concern |" in path.read_text(encoding="utf-8")]
    assert holders == ["architecture.md"]
