"""DB(path, shared=True): several DB objects (here in one process, in test_workers.py in several) on one file."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest
from helpers import contents, record_offsets, state_of

from buntsession import DB, FileLockedError

pytestmark = pytest.mark.anyio


async def test_sharers_see_each_others_writes(db_path: str) -> None:
    async with DB(db_path, shared=True) as a, DB(db_path, shared=True) as b:
        assert a.shared and a._link is not None
        await a.set("k", b"from a", ttl=60)
        assert await b.get("k") == b"from a"
        assert 59 < (await b.ttl("k") or 0) <= 60
        await b.set("k", b"from b")
        await b.set("other", b"x")
        assert await a.get("k") == b"from b"
        assert await a.expire("other", 30) is True
        assert await b.ttl("other") == pytest.approx(30, abs=1)
        assert await b.delete("k") is True
        assert await a.get("k") is None
        assert [key async for key in a.scan()] == ["other"]
        assert await a.update("n", lambda old: (b"1", None)) is True
        assert await b.update("n", lambda old: (str(int(old or b"0") + 1).encode(), None)) is True
        assert await a.get("n") == b"2"
    assert await state_of(db_path) == {"other": b"x", "n": b"2"}


async def test_interleaved_writers_lose_nothing_and_the_file_stays_clean(db_path: str) -> None:
    async with DB(db_path, shared=True) as a, DB(db_path, shared=True) as b:

        async def writer(db: DB, name: str) -> None:
            for i in range(300):
                await db.set(f"{name}:{i}", f"{name}-{i}".encode())
                if i % 10 == 0:
                    await db.delete(f"{name}:{i - 5}")

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer, a, "a")
            tg.start_soon(writer, b, "b")
        assert await contents(a) == await contents(b)
        expected = await contents(a)
    record_offsets(Path(db_path).read_bytes())
    assert await state_of(db_path) == expected
    assert len(expected) == 2 * (300 - 29)


async def test_a_rewrite_by_one_sharer_is_picked_up_by_the_others(db_path: str) -> None:
    async with DB(db_path, shared=True) as a, DB(db_path, shared=True) as b:
        for i in range(200):
            await a.set("churn", os.urandom(50))
            await b.set(f"b{i % 20}", os.urandom(50))
        before = os.path.getsize(db_path)
        await a.shrink()
        assert os.path.getsize(db_path) < before / 3
        await b.set("after", b"b writes to the new file")
        assert await a.get("after") == b"b writes to the new file"
        await b.shrink()  # the other way round
        await a.set("later", b"a too")
        assert await b.get("later") == b"a too"
        assert await contents(a) == await contents(b)
        expected = await contents(b)
    assert await state_of(db_path) == expected


async def test_concurrent_rewrites_and_writes_from_both_sides(db_path: str) -> None:
    async with DB(db_path, shared=True) as a, DB(db_path, shared=True) as b:

        async def writer(db: DB, name: str) -> None:
            for i in range(400):
                await db.set(f"{name}:{i % 50}", f"{name}-{i}".encode())

        async def shrinker(db: DB) -> None:
            for _ in range(10):
                await db.shrink()
                await anyio.sleep(0.005)

        async with anyio.create_task_group() as tg:
            for db, name in ((a, "a"), (b, "b")):
                tg.start_soon(writer, db, name)
                tg.start_soon(shrinker, db)
        expected = {f"{n}:{k}": f"{n}-{350 + k}".encode() for n in "ab" for k in range(50)}
        assert await contents(a) == expected
        assert await contents(b) == expected
    assert await state_of(db_path) == expected


async def test_sharing_is_all_or_nothing(db_path: str) -> None:
    async with DB(db_path):
        with pytest.raises(FileLockedError, match="without shared=True"):
            await DB(db_path, shared=True).open()
    async with DB(db_path, shared=True):
        with pytest.raises(FileLockedError, match="shared=True"):
            await DB(db_path).open()
        with pytest.raises(FileLockedError, match="other options"):
            await DB(db_path, shared=True, sync="always").open()
        async with DB(db_path, shared=True, lock_timeout=1):  # the same options: welcome
            pass
    async with DB(db_path, shared=True, sync="always"):  # alone again: new options are fine
        pass
    async with DB(db_path):  # and once every sharer is gone, one owner may have it
        pass


async def test_a_record_left_half_written_by_a_dead_sharer_is_cut_by_the_next_writer(
    db_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    from buntsession.engine import format as fmt

    async with DB(db_path, shared=True) as a, DB(db_path, shared=True) as b:
        await a.set("before", b"1")
        half = fmt.encode_record(fmt.SET, b"dying", b"x" * 50, None)[:40]
        with open(db_path, "ab") as f:  # a sharer killed in mid-write (its lock went with it)
            f.write(half)
        assert await b.get("before") == b"1"  # a reader leaves it: it might be a write in progress
        assert Path(db_path).read_bytes().endswith(half)
        await b.set("after", b"2")  # a writer holds the lock: nobody is writing, so it is debris
        assert await a.get("after") == b"2"
    record_offsets(Path(db_path).read_bytes())
    assert await state_of(db_path) == {"before": b"1", "after": b"2"}
    assert any("died writing" in r.getMessage() for r in caplog.records)


async def test_rewrites_racing_reads_and_writes_keep_every_acknowledged_write(db_path: str) -> None:
    async with DB(db_path, shared=True) as a, DB(db_path, shared=True) as b:
        acknowledged = {"a": 0, "b": 0}

        def increment(old: bytes | None) -> tuple[bytes, float | None]:
            return str(int(old or b"0") + 1).encode(), None

        async def writer(db: DB, other: DB, name: str) -> None:
            for _ in range(250):
                await db.update(name, increment)
                acknowledged[name] += 1
                assert await other.get(name) == str(acknowledged[name]).encode()  # read through the other

        async def shrinker(db: DB) -> None:
            for _ in range(60):
                await db.shrink()
                await anyio.sleep(0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer, a, b, "a")
            tg.start_soon(writer, b, a, "b")
            tg.start_soon(shrinker, a)
            tg.start_soon(shrinker, b)
    assert await state_of(db_path) == {"a": b"250", "b": b"250"}


def test_sharers_on_threads_never_read_older_than_acknowledged_through_rewrites(db_path: str) -> None:
    """Three sharers (each its own descriptors, as processes have), concurrent tasks each, rewrites every few
    hundred writes: a read never returns less than a write acknowledged before it began, and the file ends
    with every acknowledged write. (A rewrite that began on one file and went on after a read moved the log
    to a sharer's newer one used to write a snapshot against the wrong file.)"""
    import random
    import threading
    import time

    options = {"shared": True, "autoshrink_min_size": 32 * 1024, "autoshrink_percentage": 50,
               "cleanup_interval": 0.2, "lock_timeout": 5}
    acked: dict[str, int] = {}
    stale: list[tuple[str, int, int]] = []
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        async def main() -> None:
            async with DB(db_path, **options) as db:  # type: ignore[arg-type]
                async def task(seed: int) -> None:
                    rng = random.Random(seed)
                    deadline = time.monotonic() + 4
                    while time.monotonic() < deadline:
                        key = f"s{rng.randrange(100)}"
                        if rng.random() < 0.5:
                            await db.update(key, lambda old: (
                                str(int((old or b"0").rstrip(b".")) + 1).encode() + b"." * 40, time.time() + 3600))
                            found = await db.get_with_expiry(key)
                            assert found is not None
                            acked[key] = max(acked.get(key, 0), int(found[0].rstrip(b".")))
                        else:
                            expected = acked.get(key, 0)
                            found = await db.get_with_expiry(key)
                            got = int(found[0].rstrip(b".")) if found else 0
                            if got < expected:
                                stale.append((key, got, expected))
                        await anyio.sleep(0)

                async with anyio.create_task_group() as tg:
                    for s in range(4):
                        tg.start_soon(task, n * 10 + s)

        try:
            anyio.run(main)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and stale == []
    final = anyio.run(state_of, db_path)
    assert all(int(final[key].rstrip(b".")) >= n for key, n in acked.items())


async def test_a_sharer_with_a_hard_linked_file_still_sees_it_replaced(db_path: str) -> None:
    """A hard link to the data file (a backup made with `ln`) keeps a name on the old file after a sharer's
    rewrite replaced it at the path: the other sharer must still move to the new file, not go on writing
    to the old one (it would write into the backup, and its writes would be lost)."""
    async with DB(db_path, shared=True) as a, DB(db_path, shared=True) as b:
        await a.set("before", b"1")
        assert await b.get("before") == b"1"
        os.link(db_path, db_path + ".backup")
        await a.shrink()  # the path names a new file; the old one is left with one name: the backup's
        assert os.stat(db_path + ".backup").st_nlink == 1
        await b.set("after", b"2")
        await b.update("before", lambda old: ((old or b"") + b"+", None))
        assert await a.get("after") == b"2" and await a.get("before") == b"1+"
    assert await state_of(db_path) == {"before": b"1+", "after": b"2"}


async def test_a_write_waits_its_turn_while_another_process_holds_the_append_lock(db_path: str) -> None:
    """The append lock held (as by another process, in the middle of its write): a write retries, lets
    the loop's other tasks run, then backs off, and goes through once the lock is free; reads go on."""
    import fcntl
    import time

    from buntsession.engine.log import LOCK_SUFFIX

    async with DB(db_path, shared=True) as db:
        await db.set("k", b"v")
        fd = os.open(db_path + LOCK_SUFFIX, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            done = anyio.Event()

            async def write() -> None:
                await db.set("waited", b"yes")
                done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(write)
                started = time.monotonic()
                reads = 0
                while time.monotonic() - started < 0.2:
                    assert await db.get("k") == b"v"  # reads need no lock
                    reads += 1
                    await anyio.sleep(0.005)
                assert not done.is_set() and reads >= 10
                fcntl.flock(fd, fcntl.LOCK_UN)
                with anyio.fail_after(5):
                    await done.wait()
        finally:
            os.close(fd)
        assert await db.get("waited") == b"yes"
    assert await state_of(db_path) == {"k": b"v", "waited": b"yes"}
