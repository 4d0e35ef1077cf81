"""Starlette's own session tests, with buntsession's SessionMiddleware swapped in for Starlette's.

The tests come from the starlette source distribution on PyPI for the installed version, checked against a
pinned sha256 and cached between runs; nothing of them is copied into this repository. Only the middleware
is swapped: Starlette's `Session` class and everything else stay Starlette's. They run under asyncio and
trio. Without network the test skips with the reason, except in CI (CI=true), where it must run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

PINNED_SHA256 = {
    "1.10.0": "b8399098d4c1e3522734f7235dc79b1fc967f96cf139c81e0fa30479e0685f9b",
}
CACHE = Path(os.environ.get("BUNTSESSION_TEST_CACHE", Path.home() / ".cache" / "buntsession-tests"))
ORIGINAL_IMPORT = "from starlette.middleware.sessions import Session, SessionMiddleware\n"
SWAPPED_IMPORT = "from starlette.middleware.sessions import Session\nfrom buntsession import SessionMiddleware\n"
FILES = ["tests/__init__.py", "tests/types.py", "tests/conftest.py", "tests/middleware/__init__.py",
         "tests/middleware/test_session.py"]
PYTEST_INI = """[pytest]
addopts = -rXs --strict-config --strict-markers -p no:cacheprovider
xfail_strict = true
filterwarnings =
    error
    ignore: Using `httpx` with `starlette.testclient` is deprecated.*:starlette.exceptions.StarletteDeprecationWarning
"""


def sdist(version: str) -> Path:
    """The verified sdist of starlette `version`, from the cache or PyPI."""
    if version not in PINNED_SHA256:
        pytest.fail(f"no pinned sha256 for starlette {version}: check its sdist by hand and add it")
    name = f"starlette-{version}.tar.gz"
    cached = CACHE / name
    if not cached.exists():
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                 f"starlette=={version}", "-d", tmp],
                capture_output=True, text=True, timeout=300, check=False,
            )
            if done.returncode != 0:
                reason = f"could not download the starlette {version} sdist: {done.stderr.strip()[-300:]}"
                if os.environ.get("CI") == "true":
                    pytest.fail(reason)
                pytest.skip(reason)
            CACHE.mkdir(parents=True, exist_ok=True)
            os.replace(Path(tmp) / name, cached)
    digest = hashlib.sha256(cached.read_bytes()).hexdigest()
    if digest != PINNED_SHA256[version]:
        cached.unlink()
        pytest.fail(f"{name} has sha256 {digest}, not the pinned {PINNED_SHA256[version]}")
    return cached


@pytest.mark.slow
def test_starlettes_session_tests_pass_with_buntsession(tmp_path: Path) -> None:
    version = importlib.metadata.version("starlette")
    with tarfile.open(sdist(version)) as archive:
        for relative in FILES:
            member = archive.extractfile(f"starlette-{version}/{relative}")
            assert member is not None, relative
            target = tmp_path / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(member.read())
    test_file = tmp_path / "tests/middleware/test_session.py"
    source = test_file.read_text()
    assert source.count(ORIGINAL_IMPORT) == 1, "Starlette's test imports changed: update the swap"
    test_file.write_text(source.replace(ORIGINAL_IMPORT, SWAPPED_IMPORT))
    (tmp_path / "pytest.ini").write_text(PYTEST_INI)

    env = {**os.environ, "BUNTSESSION_PATH": str(tmp_path / "sessions.db")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "tests/middleware/test_session.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-6000:]
    assert "[trio" in report and "[asyncio" in report, "both backends must run"
    assert " skipped" not in report and " failed" not in report, report[-3000:]
