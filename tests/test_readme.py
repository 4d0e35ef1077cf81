"""Every Python snippet in the README runs: scripts as scripts, test modules under pytest."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import run_snippet

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 2  # the rest of the guide is on the documentation site: tests/test_docs.py


@pytest.mark.parametrize("number", range(len(SNIPPETS)))
def test_readme_snippet_runs(number: int, tmp_path: Path) -> None:
    run_snippet(SNIPPETS[number], tmp_path, f"README snippet {number}")
