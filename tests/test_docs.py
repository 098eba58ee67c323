"""The README is a landing page and the docs hold together: the README stays under 8 KiB, every
relative link in the README, ``docs/`` and the results index resolves (file and heading), the Python
examples in them at least compile, the results index names every results file, and no
``[Note: ...]`` in the packages cites a commit hash (history belongs in git and results files)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
PAGES = sorted([README, *(ROOT / "docs").glob("*.md"), RESULTS / "README.md"])
PACKAGES = ("torch_collage", "torch_graphpipe", "torch_cp", "torch_zoo")
README_MAX_BYTES = 8 * 1024

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
# A commit hash: 7 to 40 hex digits, with at least one digit and one letter (so that numbers and words
# such as "defaced" are not taken for one).
_HASH = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    seen: Counter[str] = Counter()
    anchors = set()
    for heading in _HEADING.findall(text):
        slug = _slug(heading)
        anchors.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return anchors


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in _LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_file():
            broken.append(
                f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})"
            )
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    return broken


def test_readme_is_under_8_kib():
    size = README.stat().st_size
    assert size < README_MAX_BYTES, (
        f"README.md is {size} bytes; keep it under {README_MAX_BYTES} (details go in docs/)"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    assert page.is_file(), f"{page.relative_to(ROOT)} is missing"
    assert not _broken_links(page), f"broken links in {page.relative_to(ROOT)}: {_broken_links(page)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_compile(page: Path):
    blocks = [code for lang, code in _FENCE.findall(page.read_text()) if lang == "python"]
    for i, code in enumerate(blocks):
        compile(code, f"{page.relative_to(ROOT)}[python block {i}]", "exec")


def test_readme_has_examples_and_links_to_every_doc():
    text = README.read_text()
    assert len([lang for lang, _ in _FENCE.findall(text) if lang == "python"]) >= 3
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{doc.name}" in text, f"README.md does not link docs/{doc.name}"
    assert "benchmarks/results/README.md" in text


def test_results_index_names_every_results_file():
    index = (RESULTS / "README.md").read_text()
    listed = set(re.findall(r"\]\(([^)#\s]+\.md)\)", index))
    files = {p.name for p in RESULTS.glob("*.md") if p.name != "README.md"}
    assert not files - listed, f"benchmarks/results/README.md has no line for {sorted(files - listed)}"


def _note_blocks(path: Path) -> list[tuple[int, str]]:
    """Every ``[Note: ...]`` block of ``path`` with the line that opens it: a note in a comment runs
    to the end of the comment lines, a note in a docstring to the end of the docstring."""
    lines = path.read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not re.match(r"^(#\s*)?\[Note: [^\]]+\]", stripped):
            continue
        comment = stripped.startswith("#")
        block = [stripped]
        for nxt in lines[i + 1 :]:
            s = nxt.strip()
            if comment and not s.startswith("#"):
                break
            block.append(s)
            if not comment and ('"""' in s or "'''" in s):
                break
        blocks.append((i + 1, "\n".join(block)))
    return blocks


def test_notes_cite_no_commit_hash():
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for line, block in _note_blocks(path):
                hashes = _HASH.findall(block)
                if hashes:
                    found.append(f"{path.relative_to(ROOT)}:{line} {hashes}")
    assert not found, f"[Note] blocks citing commit hashes (history belongs in git): {found}"
