"""The background work as anyio tasks: who owns them, what runs when there is no host, and what never blocks."""

from __future__ import annotations

import threading
import time

import anyio
import pytest
from helpers import FakeClock, FaultyOps

from buntsession import DB, StoreError


def _foreign_threads() -> list[str]:
    """Threads that are neither the main one nor an anyio/trio worker thread."""
    return [t.name for t in threading.enumerate() if t is not threading.main_thread()
            and not t.name.startswith(("AnyIO worker thread", "Trio thread"))
            and t.name != "asyncio_0" and not t.name.startswith("ThreadPoolExecutor")]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_open_db_starts_no_thread_of_its_own_and_its_tasks_end_at_close(db_path: str, backend: str) -> None:
    async def main() -> None:
        async with DB(db_path, cleanup_interval=0.05, autoshrink_min_size=1024) as db:
            for i in range(300):
                await db.set(f"k{i % 10}", b"x" * 100, ttl=0.5 if i % 2 else None)
            await anyio.sleep(1.3)  # a second of background work: fsync, cleanup, autoshrink
            assert _foreign_threads() == []
            assert db.stats().shrinks >= 1 and len(db._data) == 5  # autoshrunk; expired keys dropped
            await db.set("one more", b"v")
            await anyio.sleep(1.2)
            assert db.stats().fsyncs >= 1 and _foreign_threads() == []
            host = db._host
            assert host is not None
        assert db._host is None and host.done is not None and host.done.is_set()

    anyio.run(main, backend=backend)


def test_without_a_host_the_work_is_done_as_calls_arrive(db_path: str) -> None:
    """Opened on a loop that ended (as TestClient does without `with`): later writes on other loops fsync,
    drop expired keys and autoshrink themselves."""
    clock = FakeClock()
    db = DB(db_path, cleanup_interval=0.05, autoshrink_min_size=4096)
    db._clock = clock
    anyio.run(db.open)
    assert db._host is None  # its loop ended and took the host task with it

    async def write(n: int) -> None:
        for i in range(n):
            await db.set(f"k{i % 5}", b"x" * 100, ttl=10)

    anyio.run(write, 10)
    fsyncs = db.stats().fsyncs
    time.sleep(1.1)
    clock.advance(60)  # every key has expired
    anyio.run(write, 1)  # this write finds the fsync overdue and does it
    assert db.stats().fsyncs == fsyncs + 1
    assert db._cleanup_batches >= 1 and set(db._data) == {"k0"}
    for _ in range(3):
        anyio.run(write, 60, backend="trio")
        time.sleep(0.06)
    anyio.run(write, 1)
    assert db.stats().shrinks >= 1
    anyio.run(db.close)


def test_stats_never_waits_for_a_write_failing_on_a_full_disk(db_path: str) -> None:
    class SlowTruncate(FaultyOps):
        def ftruncate(self, fd: int, size: int) -> None:
            time.sleep(0.5)  # cutting the failed write takes a while (in a worker thread)
            super().ftruncate(fd, size)

    ops = SlowTruncate()
    db = DB(db_path)
    db._fileops = ops

    async def main() -> None:
        async with db:
            await db.set("k", b"v")
            ops.short_writes = 1
            worst = 0.0
            async with anyio.create_task_group() as tg:
                async def failing() -> None:
                    with pytest.raises(StoreError):
                        await db.set("big", b"x" * 100)

                tg.start_soon(failing)
                await anyio.sleep(0.05)
                for _ in range(10):  # a health endpoint, while the write is being cut off
                    started = time.perf_counter()
                    assert db.stats().keys == 1 and len(db) == 1
                    worst = max(worst, time.perf_counter() - started)
                    await anyio.sleep(0.02)
            assert worst < 0.05
            await db.set("after", b"ok")  # writes waited at the gate, and go on
            assert await db.get("after") == b"ok"

    anyio.run(main)
