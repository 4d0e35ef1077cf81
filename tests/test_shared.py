"""DB(path, shared=True): several DB objects (here in one process, in test_workers.py in several) on one file."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest
from helpers import contents, record_offsets, state_of

from buntsession import DB, FileLockedError
from buntsession.engine.shared import SharedDB

pytestmark = pytest.mark.anyio


async def test_sharers_see_each_others_writes(db_path: str) -> None:
    async with DB(db_path, shared=True) as a, DB(db_path, shared=True) as b:
        assert isinstance(a, SharedDB)
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
