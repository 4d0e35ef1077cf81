"""Every Python snippet in the README runs: scripts as scripts, test modules under pytest."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 2  # the rest of the guide is on the documentation site: tests/test_docs.py


@pytest.mark.parametrize("number", range(len(SNIPPETS)))
def test_readme_snippet_runs(number: int, tmp_path: Path) -> None:
    code = SNIPPETS[number]
    script = tmp_path / f"test_snippet_{number}.py"
    script.write_text(code)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(script)] if "def test_" in code \
        else [sys.executable, str(script)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"snippet {number}:\n{code}\n{done.stdout}\n{done.stderr}"
