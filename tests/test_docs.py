"""The README and docs/ stay true to the tree: links resolve, the README stays a front page, and
the test command that .ci/run reads stays where it looks for it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/results/README.md"]
MAX_README_LINES = 300
MARKER = "<!-- test command"

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)


def prose(text: str) -> str:
    """The text without code blocks and inline code, where a bracket is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings (code blocks' '#' lines are not headings)."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(h) for h in HEADING.findall(text)}


def links(path: Path) -> list[str]:
    """Every link target in the prose of a markdown file."""
    found = LINK.findall(prose(path.read_text(encoding="utf-8")))
    return [a or b for a, b in found]


def broken_links(path: Path) -> list[str]:
    """Relative links of ``path`` whose file, or whose heading in a markdown file, is missing."""
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target} (no heading #{fragment} in {resolved.name})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert page.exists(), f"{page} is missing"
    assert broken_links(page) == []


def test_the_link_pattern_still_finds_the_readmes_links():
    assert len(links(README)) > 10, "the link pattern no longer matches the README's links"


def test_a_broken_link_is_caught(tmp_path):
    """The checker itself: a missing file and a missing heading are both reported."""
    (tmp_path / "other.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-heading) [gone](missing.md) [bad](other.md#nope) `[code](no.md)`\n"
        "```\n[fenced](no.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.md (no such file)",
        "other.md#nope (no heading #nope in other.md)",
    ]


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_readme_keeps_the_test_command_that_ci_runs():
    """.ci/run takes the first code block after the marker; it must be the full suite's line."""
    text = README.read_text(encoding="utf-8")
    assert MARKER in text
    after = text.split(MARKER, 1)[1]
    block = re.search(r"^```bash\n(.*?)^```", after, re.MULTILINE | re.DOTALL)
    assert block is not None, "no ```bash block after the test command marker"
    assert "python -m pytest" in block.group(1)
    awk = shutil.which("awk")
    if awk is None:
        pytest.skip("no awk here to run .ci/run's extraction")
    script = (ROOT / ".ci/run").read_text(encoding="utf-8")
    program = re.search(r"awk '([^']*)' README\.md", script)
    assert program is not None, ".ci/run no longer extracts with awk as this test expects"
    extracted = subprocess.run(
        [awk, program.group(1), str(README)], capture_output=True, text=True, check=True
    ).stdout
    assert extracted == block.group(1)


def test_the_engine_cache_file_is_not_called_a_step_file_in_the_docs():
    """A "step file" is the exported deployment file; the engine's cache holds executor files."""
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        text = COMMENT.sub("", page.read_text(encoding="utf-8"))  # TODO notes may say "was"
        for old in ("onnx-steps", "step-KEY"):
            assert old not in text, f"{page.name} names the executor file by its old name {old}"
