"""The documentation travels with the repository: every relative link in README.md and docs/
lands on a file of this repository (and on a heading there, when it names one), and nothing
points outside the checkout, where a user's clone has nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)


def relative_links(document: Path) -> list[str]:
    """Link targets that are neither URLs (scheme:) nor anchors within the same page."""
    return [target for target in LINK.findall(document.read_text())
            if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith("#")]


def heading_anchors(document: Path) -> set[str]:
    """GitHub's anchors for a markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", document.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_the_contract_is_in_the_repository_and_linked_from_the_readme() -> None:
    assert (ROOT / "docs" / "contract.md").is_file()
    assert "docs/contract.md" in relative_links(ROOT / "README.md")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_in_the_repository(document: Path) -> None:
    links = relative_links(document)
    for target in links:
        path, _, anchor = target.partition("#")
        resolved = (document.parent / path).resolve()
        assert resolved.is_relative_to(ROOT), f"{document.name}: {target} points outside the repository"
        assert resolved.exists(), f"{document.name}: {target} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in heading_anchors(resolved), f"{document.name}: {target}: no such heading"


def test_no_document_or_docstring_points_outside_the_repository() -> None:
    """The team's notes beside the checkout (../shared/) are not part of what users get."""
    files = [*DOCUMENTS, *ROOT.glob("ganpipe/**/*.py"), *ROOT.glob("flows/*.py")]
    offenders = [str(path.relative_to(ROOT)) for path in files if "../shared/" in path.read_text()]
    assert offenders == []
