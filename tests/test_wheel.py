"""The package as it is published: sdist and wheel build, pass `twine check`, and the wheel works on its own.

The wheel is installed with `--no-deps` into a fresh virtual environment; its dependencies (starlette,
fastapi, uvicorn...) come from the environment running the tests, appended to the new environment's path
by a `.pth` line. That keeps the test offline after the build and fast, while the package itself is imported
from the wheel only (the checkout is never on the path: the commands run from a temporary directory).
The build itself is isolated (`python -m build`), as a release build is: it fetches hatchling.
"""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import urllib.request
import zipfile
from http.cookiejar import CookieJar
from pathlib import Path

import pytest

import buntsession

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run(command: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], cwd=out, timeout=300)
    return out


def the_wheel(dist: Path) -> Path:
    (wheel,) = dist.glob("buntsession-*.whl")
    return wheel


def test_sdist_and_wheel_pass_twine_check(dist: Path) -> None:
    version = buntsession.__version__
    assert sorted(p.name for p in dist.iterdir()) == [
        f"buntsession-{version}-py3-none-any.whl", f"buntsession-{version}.tar.gz"]
    done = run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())], cwd=dist)
    assert done.stdout.count("PASSED") == 2, done.stdout


def test_the_wheel_holds_the_package_only_with_complete_metadata(dist: Path) -> None:
    version = buntsession.__version__
    with zipfile.ZipFile(the_wheel(dist)) as wheel:
        names = wheel.namelist()
        info = f"buntsession-{version}.dist-info/"
        assert all(n.startswith(("buntsession/", info)) for n in names), names
        assert "buntsession/py.typed" in names
        assert "buntsession/__init__.py" in names
        assert "buntsession/engine/__init__.py" in names
        assert "buntsession/stores/__init__.py" in names
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
        assert f"{info}licenses/LICENSE" in names
        assert "buntsession = buntsession.__main__:main" in wheel.read(f"{info}entry_points.txt").decode()
        metadata = email.message_from_bytes(wheel.read(f"{info}METADATA"))
    assert metadata["Name"] == "buntsession"
    assert metadata["Version"] == version
    assert metadata["Requires-Python"] == ">=3.11"
    assert metadata["License-Expression"] == "MIT"
    assert metadata["License-File"] == "LICENSE"
    assert metadata["Summary"]
    assert metadata["Description-Content-Type"].startswith("text/markdown")
    classifiers = metadata.get_all("Classifier")
    # The license is the PEP 639 License-Expression above, with the file; PyPI refuses an upload that also
    # carries a `License ::` classifier (deprecated by PEP 639).
    assert not [c for c in classifiers if c.startswith("License ::")]
    for wanted in ["Programming Language :: Python :: 3.11",
                   "Programming Language :: Python :: 3.12", "Programming Language :: Python :: 3.13",
                   "Framework :: FastAPI", "Framework :: AsyncIO", "Framework :: Trio",
                   "Typing :: Typed"]:
        assert wanted in classifiers
    assert any(c.startswith("Development Status :: ") for c in classifiers)
    assert metadata["Keywords"]
    assert not metadata.get_all("Project-URL")  # none invented
    extras = metadata.get_all("Provides-Extra")
    assert {"redis", "postgres"} <= set(extras)


def test_the_sdist_holds_the_sources_and_the_license(dist: Path) -> None:
    version = buntsession.__version__
    (sdist,) = dist.glob("buntsession-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.removeprefix(f"buntsession-{version}/") for n in tar.getnames()}
    for wanted in ["pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE", "buntsession/py.typed",
                   "buntsession/__init__.py", "tests/test_wheel.py", "examples/app.py"]:
        assert wanted in names
    assert not [n for n in names if n.startswith((".venv", ".git/", ".ci")) or "__pycache__" in n]


def test_the_wheel_installs_and_runs_in_a_fresh_environment(dist: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(the_wheel(dist))], cwd=tmp_path)
    # The dependencies, from the environment running the tests (after the wheel's own directory on the path).
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                    cwd=tmp_path).stdout.strip())
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    where = run([str(python), "-c", "import buntsession; print(buntsession.__file__, buntsession.__version__)"],
                cwd=tmp_path).stdout.split()
    assert where == [str(site / "buntsession" / "__init__.py"), buntsession.__version__]

    for command in ([str(python), "-m", "buntsession", "--help"], [str(venv / "bin" / "buntsession"), "--help"]):
        done = run(command, cwd=tmp_path)
        assert "usage: buntsession" in done.stdout
        for sub in ["check", "stats", "dump", "repair", "shrink"]:
            assert sub in done.stdout

    # The example app, from a copy of examples/, served by uvicorn from the new environment.
    shutil.copytree(ROOT / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    from helpers import free_port

    port = free_port()
    log = (tmp_path / "uvicorn.log").open("w")
    server = subprocess.Popen(
        [str(python), "-m", "uvicorn", "examples.app:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        env={"PATH": "/usr/bin:/bin", "BUNTSESSION_PATH": str(tmp_path / "sessions.db")},
    )
    try:
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        deadline = time.monotonic() + 60
        while True:
            try:
                with opener.open(f"http://127.0.0.1:{port}/put", timeout=5) as response:
                    assert response.status == 200
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "uvicorn.log").read_text()
                assert time.monotonic() < deadline, "uvicorn did not answer"
                time.sleep(0.1)
        with opener.open(f"http://127.0.0.1:{port}/get", timeout=5) as response:
            assert response.read() == b'"Hello world!"'
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert (tmp_path / "sessions.db").exists()
    assert str(tmp_path / "sessions.db") in (tmp_path / "uvicorn.log").read_text()
