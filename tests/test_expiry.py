"""Expiry: absolute across reopen, never returned, dropped from memory in bounded batches, nothing written."""

from __future__ import annotations

import os
import time

import anyio
import pytest
from helpers import FakeClock

from buntsession import DB
from buntsession.engine import db as dbmod

pytestmark = pytest.mark.anyio


def clocked(path: str, clock: FakeClock, **options: object) -> DB:
    db = DB(path, **options)  # type: ignore[arg-type]
    db._clock = clock
    return db


async def wait_until(condition, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await anyio.sleep(0.02)


async def test_expiry_is_absolute_across_reopen(db_path: str) -> None:
    clock = FakeClock()
    async with clocked(db_path, clock) as db:
        await db.set("k", b"v", ttl=10)
        clock.advance(6)
        await db.set("other", b"v")  # a later write does not move the earlier expiry
    os.utime(db_path, (0, 0))  # nor does the file's mtime
    clock.advance(2)
    async with clocked(db_path, clock) as db:
        assert await db.ttl("k") == pytest.approx(2)
        clock.advance(2.5)
        assert await db.get("k") is None
    async with clocked(db_path, clock) as db:
        assert await db.get("k") is None
        assert len(db) == 1


async def test_dropping_expired_keys_writes_nothing(db_path: str) -> None:
    clock = FakeClock()
    async with clocked(db_path, clock, cleanup_interval=0.05) as db:
        for i in range(1000):
            await db.set(f"k{i}", b"v", ttl=5)
        size = os.path.getsize(db_path)
        clock.advance(10)
        await wait_until(lambda: not db._data)
        assert db.stats().expired == 0
        assert os.path.getsize(db_path) == size


async def test_extended_expiry_is_rescheduled_not_dropped(db_path: str) -> None:
    clock = FakeClock()
    async with clocked(db_path, clock, cleanup_interval=0.05) as db:
        await db.set("k", b"v", ttl=5)
        await db.expire("k", 100)
        await db.set("p", b"v", ttl=5)
        await db.expire("p", None)
        clock.advance(10)
        await wait_until(lambda: db._cleanup_batches > 3)
        batches = db._cleanup_batches
        await wait_until(lambda: db._cleanup_batches > batches + 2)
        assert "k" in db._data and "p" in db._data
        assert await db.ttl("k") == pytest.approx(90)
        clock.advance(100)
        await wait_until(lambda: "k" not in db._data)
        assert await db.get("p") == b"v"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_mass_expiry_runs_in_bounded_batches_and_keeps_the_loop_responsive(db_path: str) -> None:
    clock = FakeClock()
    count = 200_000
    async with clocked(db_path, clock, sync="never", cleanup_interval=0.05) as db:
        value = b"x" * 50
        for i in range(count):
            await db.set(f"session:{i:08d}", value, ttl=60 + (i % 1000) / 1000)  # all within one second
        await db.set("survivor", b"v", ttl=3600)
        batches = db._cleanup_batches
        worst = 0.0
        clock.advance(62)  # every session expires at once
        assert len(db) == 1
        while db._data.keys() != {"survivor"}:
            before = time.perf_counter()
            await anyio.sleep(0.01)
            worst = max(worst, time.perf_counter() - before - 0.01)
        assert db._cleanup_batches - batches >= count // dbmod._CLEANUP_BATCH
        assert await db.get("survivor") == b"v"
    # Wide bounds: the benchmark reports the real figures.
    assert db._cleanup_max_hold < 0.05, f"one cleanup batch held the lock {db._cleanup_max_hold * 1000:.1f} ms"
    assert worst < 0.1, f"a probe waited {worst * 1000:.1f} ms"
