"""The documentation site: every Python sample on it runs, and it builds with `mkdocs build --strict`.

Samples run as `tests/test_readme.py` runs the README's: scripts as scripts, test modules under pytest, each
in an empty temporary directory. `docs/benchmarks.md` is written by `benchmarks/report.py` and holds no
sample; it is covered all the same.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_snippet

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
SAMPLES = [(page.relative_to(DOCS).as_posix(), number, code)
           for page in PAGES
           for number, code in enumerate(re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M))]


def test_the_site_has_samples_on_its_guide_pages() -> None:
    pages = {page for page, _, _ in SAMPLES}
    for wanted in ["index.md", "fastapi.md", "starlette.md", "session.md", "stores.md", "users.md",
                   "durability.md", "deployment.md", "testing.md", "migrating.md"]:
        assert wanted in pages


def test_no_sample_is_hidden_from_this_test() -> None:
    """Python under another fence (`py`, `python3`, indented in a list) would not run: there is none."""
    for page in PAGES:
        for fence in re.findall(r"^\s*```(\S*)", page.read_text(), flags=re.M):
            assert fence in {"", "python", "sh", "sql"}, f"{page.name}: a ```{fence} block"


@pytest.mark.parametrize(("page", "number", "code"), SAMPLES, ids=[f"{p}-{n}" for p, n, _ in SAMPLES])
def test_docs_sample_runs(page: str, number: int, code: str, tmp_path: Path) -> None:
    run_snippet(code, tmp_path, f"{page}, sample {number}")


def test_the_site_builds_strict_without_warnings(tmp_path: Path) -> None:
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("mkdocs is not installed (pip install -e '.[docs]'), and CI must build the site")
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert not [line for line in output.splitlines() if line.startswith(("WARNING", "ERROR"))], output
    site = tmp_path / "site"
    for page in ["index.html", "benchmarks/index.html", "reference/index.html", "releasing/index.html",
                 "changelog/index.html"]:
        assert (site / page).is_file()
    assert (site / "benchmarks.png").is_file()
    assert "Keep a Changelog" in (site / "changelog" / "index.html").read_text()  # CHANGELOG.md, included
    reference = (site / "reference" / "index.html").read_text()
    for name in ["buntsession.SessionMiddleware", "buntsession.Session.put_string", "buntsession.DB.set",
                 "buntsession.redis.RedisStore", "buntsession.postgres.PostgresStore", "buntsession.StoreError"]:
        assert f'id="{name}"' in reference
    assert "fonts.googleapis.com" not in (site / "index.html").read_text()  # nothing fetched when viewed either
