"""No blocking file-system call runs on the event loop during requests, but the one append per commit.

Like Starlette's suite does with `blockbuster`, this watches the calls that block: fsync, fdatasync,
ftruncate, rename, replace, unlink, open and sleep, and every write, failing when one runs in a thread
that is running an event loop. The one call allowed is the engine's append: one `write` of a record, by
`AppendLog.append` or by `DB._solo_step` (the fast path of `DB.set` and `DB.update`), which inlines it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import sniffio
from session_app import make_app
from starlette.testclient import TestClient

from buntsession import DB, BuntStore
from buntsession.engine import log

WATCHED = ["fsync", "fdatasync", "ftruncate", "rename", "replace", "unlink", "open", "write"]


def on_event_loop() -> bool:
    try:
        sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return False
    return True


@contextmanager
def no_blocking_on_loop() -> Iterator[list[str]]:
    violations: list[str] = []
    append_codes = {log.AppendLog.append.__code__, DB._solo_step.__code__}

    def guard(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def watched(*args: Any, **kwargs: Any) -> Any:
            if on_event_loop():
                caller = sys._getframe(1)
                allowed = name == "write" and caller.f_code in append_codes
                if not allowed:
                    violations.append(f"{name} from {caller.f_code.co_filename}:{caller.f_lineno}")
            return real(*args, **kwargs)

        return watched

    saved = {name: getattr(os, name) for name in WATCHED}
    saved_sleep, saved_write = time.sleep, log.FileOps.write
    try:
        for name, real in saved.items():
            setattr(os, name, guard(name, real))
        time.sleep = guard("sleep", saved_sleep)
        log.FileOps.write = staticmethod(guard("write", saved["write"]))  # type: ignore[method-assign]
        yield violations
    finally:
        for name, real in saved.items():
            setattr(os, name, real)
        time.sleep = saved_sleep
        log.FileOps.write = saved_write  # type: ignore[method-assign]


@pytest.mark.parametrize("sync", ["everysec", "always", "never"])
def test_requests_block_the_loop_only_for_the_append(tmp_path: Path, sync: str) -> None:
    db = DB(str(tmp_path / "s.db"), sync=sync, autoshrink_min_size=2048, cleanup_interval=0.05)  # type: ignore[arg-type]
    with no_blocking_on_loop() as violations:
        with TestClient(make_app(BuntStore(db), idle_timeout=3600)) as client:
            for i in range(40):
                client.get(f"/put?k{i % 5}=" + "x" * 100)
                client.get("/get")
                client.get("/incr")
            client.post("/login")
            client.post("/logout")
        client.get("/put?after=lifespan")  # no lifespan: the store opens on first use, off the loop
    assert violations == []


def test_engine_calls_block_the_loop_only_for_the_append(tmp_path: Path) -> None:
    async def main() -> None:
        async with DB(str(tmp_path / "e.db"), sync="always") as db:
            for i in range(50):
                await db.set(f"k{i}", b"v" * 50, ttl=60)
            await db.expire("k1", 10)
            await db.delete("k2")
            await db.update("k3", lambda old: (b"new", None))
            await db.sync()
            await db.shrink()
            _ = [key async for key in db.scan()]

    with no_blocking_on_loop() as violations:
        anyio.run(main)
        anyio.run(main, backend="trio")
    assert violations == []


def test_the_watch_catches_a_blocking_call() -> None:
    async def careless(path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.fsync(fd)
        os.close(fd)

    with no_blocking_on_loop() as violations:
        anyio.run(careless, "/tmp/buntsession-blocking-probe")
    assert [v.split()[0] for v in violations] == ["open", "fsync"]
