"""The shipped docs: links stay inside the repository, the SDK snippet says what to install, and the
architecture map names no module that is gone."""

from __future__ import annotations

import re

from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_links_stay_inside_the_repository() -> None:
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"^[a-z]+://|^#|^mailto:", target):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), (doc.name, target)
        assert "../shared" not in doc.read_text(), doc.name  # nothing outside the repository, linked or not


def test_sdk_snippet_says_to_install_openai() -> None:
    text = (ROOT / "README.md").read_text()
    snippet = text.index("from openai import OpenAI")
    assert "pip install openai" in text[:snippet]


def test_architecture_names_only_modules_that_exist() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`([a-z_]+)\.py`", doc))
    have = {p.stem for p in (ROOT / "teraproxy").glob("*.py")} - {"__init__", "__main__"}
    assert len(named) >= 20 and named <= have, sorted(named - have)
