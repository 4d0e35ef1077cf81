"""The README's example app, served by a real uvicorn: the counter survives a restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(db_path: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EXAMPLE_DB": db_path}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "examples"), "app:app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/stats", timeout=1)
            return server
        except httpx.TransportError:
            assert server.poll() is None, server.stdout.read() if server.stdout else b""
            time.sleep(0.1)
    server.kill()
    pytest.fail("uvicorn did not start")


def stop(server: subprocess.Popen[bytes]) -> None:
    server.send_signal(signal.SIGINT)  # a graceful shutdown runs the lifespan's close
    server.wait(timeout=30)


def test_example_app_counts_visits_across_a_restart(tmp_path: Path) -> None:
    db_path = str(tmp_path / "example.db")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = serve(db_path, port)
    try:
        assert httpx.get(base + "/").json()["visits"] == 1
        assert httpx.get(base + "/").json()["visits"] == 2
        assert httpx.put(base + "/kv/greeting?ttl=60", content=b"hello").status_code == 204
        reply = httpx.get(base + "/kv/greeting")
        assert reply.content == b"hello" and 0 < float(reply.headers["X-TTL"]) <= 60
        assert httpx.get(base + "/kv/missing").status_code == 404
    finally:
        stop(server)
    server = serve(db_path, port)
    try:
        assert httpx.get(base + "/").json()["visits"] == 3
        assert httpx.get(base + "/kv/greeting").content == b"hello"
    finally:
        stop(server)
