"""The middleware's seams under a real uvicorn: a store that cannot open stops the startup, the default store
works under several workers with no setting, and where it keeps sessions shows in the server's log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import free_port

from buntsession import DB

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def uvicorn(app: str, port: int, env: dict[str, str], *options: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port), *options],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(TESTS), **env}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )


def wait_until_serving(server: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert server.poll() is None, server.communicate()[0]
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    server.kill()
    pytest.fail("uvicorn did not start")


def stop(server: subprocess.Popen[str]) -> str:
    server.send_signal(signal.SIGINT)
    output, _ = server.communicate(timeout=30)
    return output


def test_a_damaged_store_stops_the_startup_with_its_own_message(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    path.write_bytes(b"this is not a buntsession file at all")
    server = uvicorn("examples.app:app", free_port(), {"BUNTSESSION_PATH": str(path)})  # --lifespan auto
    output, _ = server.communicate(timeout=60)
    assert server.returncode != 0, output
    assert "CorruptFileError" in output and "not a buntsession data file" in output and str(path) in output
    assert "Application startup failed" in output
    assert "unsupported" not in output and "Uvicorn running" not in output
    assert path.read_bytes() == b"this is not a buntsession file at all"  # left as it was


def test_a_store_held_by_another_owner_stops_the_startup(tmp_path: Path) -> None:
    import anyio

    path = str(tmp_path / "sessions.db")

    async def hold_while_serving() -> tuple[int | None, str]:
        async with DB(path):  # an exclusive owner: the default store (shared) cannot join it
            server = uvicorn("examples.app:app", free_port(), {"BUNTSESSION_PATH": path})
            output, _ = await anyio.to_thread.run_sync(lambda: server.communicate(timeout=60))
            return server.returncode, output

    code, output = anyio.run(hold_while_serving)
    assert code != 0, output
    assert "FileLockedError" in output and "BUNTSESSION_PATH" in output and "Application startup failed" in output


@pytest.mark.slow
def test_the_default_store_just_works_under_two_workers_and_says_where_it_is(tmp_path: Path) -> None:
    path = str(tmp_path / "sessions.db")
    port = free_port()
    server = uvicorn("default_store_app:app", port, {"BUNTSESSION_PATH": path}, "--workers", "2")
    try:
        wait_until_serving(server, port)
        pids: set[str] = set()
        statuses: list[int] = []
        tokens = []
        for i in range(8):  # a new connection for every request, so both workers take some
            response = httpx.get(f"http://127.0.0.1:{port}/put?value={i}")
            statuses.append(response.status_code)
            pids.add(response.headers["x-pid"])
            tokens.append(response.cookies["session"])
        for _ in range(5):
            for i, token in enumerate(tokens):
                response = httpx.get(f"http://127.0.0.1:{port}/get", cookies={"session": token})
                statuses.append(response.status_code)
                pids.add(response.headers["x-pid"])
                assert response.text == str(i), (response.headers["x-pid"], response.text)
        assert set(statuses) == {200}
        assert len(pids) == 2, "both workers served"
    finally:
        output = stop(server)
    assert output.count(f"sessions are kept in {path}") == 2, output  # one line per worker, at startup
