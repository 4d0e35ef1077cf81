"""Shared test helpers: a settable clock, fault-injecting file operations, file surgery, and running the
documentation's samples."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from buntsession import DB
from buntsession.engine import format as fmt
from buntsession.engine.log import FileOps


class FakeClock:
    """A wall clock that moves only when told to."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FaultyOps(FileOps):
    """FileOps that fail on demand: the next N fsyncs, writes cut short, a hook per rewrite phase."""

    def __init__(self) -> None:
        self.fail_fsyncs = 0
        self.short_writes = 0
        self.short_by = 5
        self.fail_writes = 0
        self.fail_truncates = 0
        self.fsync_calls = 0
        self.on_phase: Callable[[str], None] | None = None

    def fsync(self, fd: int) -> None:
        self.fsync_calls += 1
        if self.fail_fsyncs:
            self.fail_fsyncs -= 1
            raise OSError(errno.EIO, "injected fsync failure")
        super().fsync(fd)

    def write(self, fd: int, data: bytes) -> int:
        if self.fail_writes:
            self.fail_writes -= 1
            raise OSError(errno.ENOSPC, "injected: no space left on device")
        if self.short_writes and len(data) > self.short_by:
            self.short_writes -= 1
            return super().write(fd, data[: -self.short_by])
        return super().write(fd, data)

    def ftruncate(self, fd: int, size: int) -> None:
        if self.fail_truncates:
            self.fail_truncates -= 1
            raise OSError(errno.EIO, "injected truncate failure")
        super().ftruncate(fd, size)

    def phase(self, name: str) -> None:
        if self.on_phase is not None:
            self.on_phase(name)


def record_offsets(data: bytes) -> list[int]:
    """Start offsets of every record in a well-formed file, plus the end of the last one."""
    offsets = []
    pos = fmt.FILE_HEADER_SIZE
    while pos < len(data):
        offsets.append(pos)
        key_len = int.from_bytes(data[pos + 6 : pos + 8], "little")
        value_len = int.from_bytes(data[pos + 8 : pos + 12], "little")
        pos += fmt.RECORD_HEADER_SIZE + key_len + value_len
    assert pos == len(data), "not a well-formed file"
    offsets.append(pos)
    return offsets


def fix_record_checksums(data: bytearray, offset: int) -> None:
    """Recompute both checksums of the record at `offset` after a test edited it."""
    key_len = int.from_bytes(data[offset + 6 : offset + 8], "little")
    value_len = int.from_bytes(data[offset + 8 : offset + 12], "little")
    body = offset + fmt.RECORD_HEADER_SIZE
    key = bytes(data[body : body + key_len])
    value = bytes(data[body + key_len : body + key_len + value_len])
    salt = fmt.check_file_header(bytes(data)).salt  # the checksums start from the file's salt
    data[offset + 20 : offset + 24] = zlib.crc32(value, zlib.crc32(key, salt)).to_bytes(4, "little")
    data[offset + 24 : offset + 28] = zlib.crc32(bytes(data[offset : offset + 24]), salt).to_bytes(4, "little")


async def contents(db: DB) -> dict[str, bytes]:
    """Every live key and its value."""
    out = {}
    async for key in db.scan():
        value = await db.get(key)
        assert value is not None
        out[key] = value
    return out


async def state_of(path: str) -> dict[str, bytes]:
    """Open the file in a fresh DB and return its live contents."""
    async with DB(path) as db:
        return await contents(db)


def read_state(path: str) -> dict[str, bytes]:
    """`state_of`, on an event loop of its own."""
    return anyio.run(state_of, path)


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


async def asgi_get(app: Any, headers: list[tuple[bytes, bytes]], path: str = "/") -> tuple[int, list[Any]]:
    """Call an ASGI app directly with any header bytes (no client would send some of them); return the
    response's status and headers."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "server": ("test", 80), "client": ("127.0.0.1", 1)}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], sent[0].get("headers", [])


def free_port() -> int:
    """A free TCP port on loopback, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_snippet(code: str, tmp_path: Path, label: str) -> None:
    """Run a documentation sample: a test module under pytest, anything else as a script."""
    script = tmp_path / "test_sample.py"
    script.write_text(code)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(script)] if "def test_" in code \
        else [sys.executable, str(script)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{label}:\n{code}\n{done.stdout}\n{done.stderr}"
