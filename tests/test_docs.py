"""README.md and docs/ are plain Markdown read on GitHub: every relative link must resolve.

A link ``[text](path)`` or ``[text](path#anchor)`` must name an existing file or folder, relative
to the linking file; an anchor into a Markdown file must name one of its headings, by GitHub's
rule (lowercase, punctuation other than ``-`` and ``_`` dropped, spaces to ``-``, repeats
numbered). External links are not fetched.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def prose(text: str) -> str:
    """The text without code blocks and code spans, where brackets are not links."""
    return CODE.sub("", FENCE.sub("", text))


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of ``page``'s headings (a repeated one gets ``-1``, ``-2``, ...)."""
    slugs, seen = set(), {}
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        slugs.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return slugs


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not fetched
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no such heading in {linked.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = broken_links(page)
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_a_door():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= 250, f"README.md has {lines} lines; move the depth to docs/"


def test_ci_runs_the_readmes_test_command_and_then_the_slow_tier():
    """CI must run what the README tells a user to run, and the tests that command skips."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (command,) = [line for line in readme.splitlines() if line.startswith("pip install") and "pytest" in line]
    ci = (ROOT / ".ci/run").read_text().replace("\\\n", " ").split()  # one chain: a failed step fails CI (set -e)
    assert ci[-len(command.split()) - 8:] == [*command.split(), "&&", "python", "-m", "pytest", "-q", "--slow", "-m", "slow"]
