"""README.md and docs/*.md: every relative link and picture resolves, anchors included (GitHub's heading slugs)."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces ->
    hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page):
    heads = [line.lstrip("#").strip() for line in page.read_text().splitlines() if re.match(r"#{1,6} ", line)]
    return {slug(h) for h in heads}


def test_slug_follows_github():
    assert slug("2. The paper's tables in miniature") == "2-the-papers-tables-in-miniature"
    assert slug("Quick start on a CPU") == "quick-start-on-a-cpu"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    links = [m for m in LINK.findall(page.read_text()) if not re.match(r"[a-z]+://|mailto:", m)]
    assert links or page.name != "README.md"  # README links to its docs and pictures
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: {link} does not exist"
        if anchor:
            assert anchor in anchors(target), f"{page.name}: {link}: no heading with that anchor"
