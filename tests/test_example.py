"""The README's example app, served by a real uvicorn: sessions survive a restart, login and logout work."""

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

ROOT = Path(__file__).resolve().parent.parent


def serve(db_path: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BUNTSESSION_PATH": db_path}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.app:app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/get", timeout=1)
            return server
        except httpx.TransportError:
            assert server.poll() is None, server.stdout.read() if server.stdout else b""
            time.sleep(0.1)
    server.kill()
    pytest.fail("uvicorn did not start")


def stop(server: subprocess.Popen[bytes]) -> None:
    server.send_signal(signal.SIGINT)  # a graceful shutdown runs the lifespan's close
    server.wait(timeout=30)


def test_example_app_keeps_sessions_across_a_restart(tmp_path: Path) -> None:
    db_path = str(tmp_path / "sessions.db")
    port = free_port()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}")
    server = serve(db_path, port)
    try:
        assert client.get("/get").json() == ""
        put = client.get("/put")
        assert "httponly" in put.headers["set-cookie"].lower()
        assert client.get("/get").json() == "Hello world!"
        assert [client.get("/visits").json() for _ in range(3)] == [1, 2, 3]
    finally:
        stop(server)
    server = serve(db_path, port)  # a new process reads the same file
    try:
        assert client.get("/get").json() == "Hello world!"
        assert client.get("/visits").json() == 4
        before = client.cookies["session"]
        client.post("/login")
        assert client.cookies["session"] != before
        assert client.get("/get").json() == "Hello world!"  # the data moved to the new token
        stale = httpx.Client(base_url=client.base_url, cookies={"session": before})
        assert stale.get("/get").json() == ""  # the old token is dead
        client.post("/logout")
        assert client.get("/get").json() == ""
    finally:
        stop(server)
