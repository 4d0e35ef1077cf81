"""fsync policies, group commit, and what a failed write or fsync does (through the FileOps seam)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import anyio
import pytest
from helpers import FaultyOps, record_offsets, state_of

from buntsession import DB, StoreError

pytestmark = pytest.mark.anyio


class SlowFsync(FaultyOps):
    """fsync takes 50 ms, so that concurrent writers queue behind one in flight."""

    def fsync(self, fd: int) -> None:
        time.sleep(0.05)
        super().fsync(fd)


def faulty_db(path: str, ops: FaultyOps | None = None, **options: object) -> tuple[DB, FaultyOps]:
    db = DB(path, **options)  # type: ignore[arg-type]
    db._fileops = ops or FaultyOps()
    return db, db._fileops  # type: ignore[return-value]


async def test_always_fsyncs_before_each_write_returns(db_path: str) -> None:
    db, ops = faulty_db(db_path, sync="always")
    async with db:
        start = ops.fsync_calls
        for i in range(5):
            await db.set(f"k{i}", b"v")
            assert ops.fsync_calls == start + i + 1
        await db.delete("k0")
        await db.expire("k1", 10)
        assert ops.fsync_calls == start + 7


async def test_always_group_commit_shares_fsyncs(db_path: str) -> None:
    db, ops = faulty_db(db_path, SlowFsync(), sync="always")
    async with db:
        start = ops.fsync_calls
        async with anyio.create_task_group() as tg:
            for i in range(64):
                tg.start_soon(db.set, f"k{i}", b"v" * 200)
        fsyncs = ops.fsync_calls - start
        assert len(db) == 64
    # While the first fsync is in flight every other writer appends and waits; the next fsync covers them all.
    assert 1 <= fsyncs <= 3


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # timing of a thread: the loop does not matter
async def test_everysec_fsyncs_in_the_background_only_after_writes(db_path: str) -> None:
    db, ops = faulty_db(db_path)
    async with db:
        await anyio.sleep(1.2)
        idle = ops.fsync_calls
        await db.set("k", b"v")
        deadline = time.monotonic() + 10
        while ops.fsync_calls == idle and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        assert ops.fsync_calls == idle + 1
        assert db.stats().fsyncs >= 1
        await anyio.sleep(2.2)  # nothing written since: no more fsyncs
        assert ops.fsync_calls == idle + 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_never_fsyncs_only_on_close(db_path: str) -> None:
    db, ops = faulty_db(db_path, sync="never")
    async with db:
        start = ops.fsync_calls
        await db.set("k", b"v")
        await anyio.sleep(1.5)
        assert ops.fsync_calls == start
    assert ops.fsync_calls == start + 1


async def test_explicit_sync(db_path: str) -> None:
    db, ops = faulty_db(db_path, sync="never")
    async with db:
        await db.set("k", b"v")
        before = ops.fsync_calls
        await db.sync()
        assert ops.fsync_calls == before + 1
        await db.sync()  # nothing new written: nothing to do
        assert ops.fsync_calls == before + 1


async def test_failed_fsync_under_always_raises_and_refuses_writes(
    db_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    db, ops = faulty_db(db_path, sync="always")
    async with db:
        await db.set("before", b"1")
        ops.fail_fsyncs = 1
        with pytest.raises(StoreError, match="fsync") as info:
            await db.set("during", b"2")
        assert isinstance(info.value.__cause__, OSError)
        for call in (db.set("after", b"3"), db.delete("before"), db.expire("before", 5), db.sync()):
            with pytest.raises(StoreError, match="reopen"):
                await call
        assert await db.get("before") == b"1"  # reads go on
    assert any("fsync" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    async with DB(db_path, sync="always") as db:  # reopening clears the failed state
        await db.set("after", b"3")
        assert await db.get("during") == b"2"  # it was written to the OS, just not known to be durable


async def test_failed_background_fsync_puts_db_in_failed_state(
    db_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    db, ops = faulty_db(db_path)
    async with db:
        ops.fail_fsyncs = 1
        await db.set("k", b"v")
        deadline = time.monotonic() + 10
        while db._failed is None and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        with pytest.raises(StoreError, match="reopen"):
            await db.set("k2", b"v")
        assert await db.get("k") == b"v"
    assert any("background fsync" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


@pytest.mark.parametrize("fault", ["short", "enospc"])
async def test_failed_write_leaves_no_partial_record(db_path: str, fault: str) -> None:
    db, ops = faulty_db(db_path)
    async with db:
        await db.set("a", b"first")
        size = os.path.getsize(db_path)
        if fault == "short":
            ops.short_writes = 1
        else:
            ops.fail_writes = 1
        with pytest.raises(StoreError) as info:
            await db.set("b", b"x" * 100)
        assert isinstance(info.value.__cause__, OSError) or fault == "short"
        assert os.path.getsize(db_path) == size  # truncated back to the record boundary
        record_offsets(Path(db_path).read_bytes())  # the file is well formed
        assert await db.get("b") is None
        assert await db.get("a") == b"first"
        await db.set("c", b"later")  # a failed write is not a failed DB: writes resume
    assert await state_of(db_path) == {"a": b"first", "c": b"later"}


async def test_failed_truncate_after_short_write_fails_the_db_but_file_stays_loadable(db_path: str) -> None:
    db, ops = faulty_db(db_path)
    async with db:
        await db.set("a", b"first")
        ops.short_writes = 1
        ops.fail_truncates = 1
        with pytest.raises(StoreError):
            await db.set("b", b"x" * 100)
        with pytest.raises(StoreError, match="reopen"):
            await db.set("c", b"y")
    assert await state_of(db_path) == {"a": b"first"}  # the partial record is a torn tail


async def test_close_reports_a_failed_final_fsync(db_path: str) -> None:
    db, ops = faulty_db(db_path, sync="never")
    await db.open()
    await db.set("k", b"v")
    ops.fail_fsyncs = 1
    with pytest.raises(StoreError, match="close"):
        await db.close()
    assert not db._open
