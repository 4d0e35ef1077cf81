"""One owner per file: other processes, other DB objects and forked children are refused."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest
from helpers import read_state
from test_crash import kill, start, wait_for_line

from buntsession import DB, FileLockedError


def test_a_second_process_is_refused_with_a_helpful_message(db_path: str) -> None:
    async def main() -> None:
        async with DB(db_path) as db:
            await db.set("k", b"v")
            child = start(db_path, "try")
            out, _ = await anyio.to_thread.run_sync(lambda: child.communicate(timeout=30))
            assert out.startswith("LOCKED ")
            assert db_path in out and "shared=True" in out
            assert await db.get("k") == b"v"

    anyio.run(main)


def test_a_second_db_object_in_the_same_process_is_refused(db_path: str) -> None:
    async def main() -> None:
        async with DB(db_path):
            with pytest.raises(FileLockedError) as info:
                await DB(db_path).open()
            assert info.value.path == db_path
            with pytest.raises(FileLockedError):
                await DB(os.path.relpath(db_path)).open()  # another spelling of the same file

    anyio.run(main)
    read_state(db_path)  # and once both are gone, the file opens


def test_lock_timeout_waits_for_the_owner_to_let_go(db_path: str) -> None:
    holder = start(db_path, "hold")
    wait_for_line(holder, "OPEN")

    async def main() -> float:
        started = time.monotonic()
        with pytest.raises(FileLockedError):
            await DB(db_path, lock_timeout=0.3).open()
        assert time.monotonic() - started >= 0.3
        assert holder.stdin is not None
        holder.stdin.close()  # the holder closes its DB and exits
        started = time.monotonic()
        async with DB(db_path, lock_timeout=20):
            return time.monotonic() - started

    waited = anyio.run(main)
    assert waited < 20
    holder.wait(timeout=30)


def test_the_lock_goes_with_a_killed_process(db_path: str) -> None:
    holder = start(db_path, "hold")
    wait_for_line(holder, "OPEN")
    kill(holder)
    read_state(db_path)  # lock_timeout 0: no waiting needed


def test_a_forked_child_cannot_use_the_parents_db(db_path: str) -> None:
    db = DB(db_path)
    anyio.run(db.open)
    anyio.run(db.set, "parent", b"1")
    pid = os.fork()  # outside any event loop, as a pre-forking server does
    if pid == 0:  # the child: every use must be refused
        code = 1
        try:
            anyio.run(db.set, "child", b"2")
        except FileLockedError as exc:
            code = 0 if "forked" in str(exc) else 3
        except BaseException:
            code = 2
        try:
            anyio.run(db.close)  # and closing it there leaves the parent's lock alone
        except BaseException:
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

    async def parent() -> None:
        await db.set("parent-after", b"3")
        with pytest.raises(FileLockedError):
            await DB(db_path).open()  # the parent still holds the lock
        await db.close()

    anyio.run(parent)
    assert read_state(db_path) == {"parent": b"1", "parent-after": b"3"}


def test_no_lock_file_or_other_file_is_left_beside_the_data(tmp_path: Path) -> None:
    path = str(tmp_path / "d.db")

    async def main() -> None:
        async with DB(path) as db:
            await db.set("k", b"v")
            await db.shrink()

    anyio.run(main)
    assert os.listdir(tmp_path) == ["d.db"]

