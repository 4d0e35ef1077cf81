"""The DB's public behaviour: values, expiry, counting opens, argument checks, both event loops."""

from __future__ import annotations

import os
import stat

import anyio
import pytest
from helpers import FakeClock, contents, file_bytes

from buntsession import DB, Stats, StoreError

pytestmark = pytest.mark.anyio


async def test_set_get_delete_round_trip(db_path: str) -> None:
    async with DB(db_path) as db:
        assert await db.get("k") is None
        await db.set("k", b"v")
        assert await db.get("k") == b"v"
        await db.set("k", b"w")
        assert await db.get("k") == b"w"
        assert await db.delete("k") is True
        assert await db.delete("k") is False
        assert await db.get("k") is None


async def test_values_are_binary_safe_and_come_back_as_bytes(db_path: str) -> None:
    weird = bytes(range(256)) * 3 + b"\r\n\x00"
    async with DB(db_path) as db:
        await db.set("bytes", weird)
        await db.set("bytearray", bytearray(b"\x00\xff"))
        await db.set("memoryview", memoryview(b"abc")[1:])
        await db.set("empty", b"")
        await db.set("ключ\u2603\x00", b"unicode key")
    async with DB(db_path) as db:
        assert await db.get("bytes") == weird
        assert await db.get("bytearray") == b"\x00\xff"
        assert type(await db.get("bytearray")) is bytes
        assert await db.get("memoryview") == b"bc"
        assert await db.get("empty") == b""
        assert await db.get("ключ\u2603\x00") == b"unicode key"


async def test_ttl_expire_and_persist(db_path: str) -> None:
    clock = FakeClock()
    db = DB(db_path)
    db._clock = clock
    async with db:
        await db.set("a", b"1", ttl=30)
        await db.set("b", b"2")
        assert await db.ttl("a") == pytest.approx(30)
        assert await db.ttl("b") is None
        assert await db.ttl("missing") is None
        assert await db.expire("b", 10.5) is True
        assert await db.ttl("b") == pytest.approx(10.5)
        assert await db.expire("a", None) is True
        assert await db.ttl("a") is None
        assert await db.expire("missing", 5) is False
        clock.advance(11)
        assert await db.get("b") is None
        assert await db.expire("b", 100) is False
        assert await db.get("a") == b"1"


async def test_expired_keys_are_never_returned(db_path: str) -> None:
    clock = FakeClock()
    db = DB(db_path, cleanup_interval=3600)  # no background pass during the test
    db._clock = clock
    async with db:
        for i in range(10):
            await db.set(f"short:{i}", b"x", ttl=5)
            await db.set(f"long:{i}", b"x", ttl=50)
        clock.advance(10)
        assert len(db) == 10
        stats = db.stats()
        assert (stats.keys, stats.expired) == (10, 10)
        assert sorted([k async for k in db.scan("short:")]) == []
        assert len([k async for k in db.scan()]) == 10
        assert await db.get("short:1") is None
        assert await db.ttl("short:2") is None
        assert await db.delete("short:3") is False
        assert db.stats().expired == 7  # the three touched above were dropped on the way
        assert len(db) == 10


async def test_scan_filters_by_prefix(db_path: str) -> None:
    async with DB(db_path) as db:
        for i in range(2500):
            await db.set(f"{'a' if i % 2 else 'b'}:{i}", b"")
        found = [k async for k in db.scan("a:")]
        assert len(found) == 1250 and all(k.startswith("a:") for k in found)
        assert len(set(found)) == len(found)
        assert len([k async for k in db.scan()]) == 2500


async def test_memory_db_keeps_no_file(tmp_path: os.PathLike[str]) -> None:
    before = os.listdir(tmp_path)
    db = DB(":memory:")
    async with db:
        await db.set("k", b"v", ttl=60)
        assert await db.get("k") == b"v"
        await db.sync()
        await db.shrink()
        assert db.stats().file_size == 0
    assert os.listdir(tmp_path) == before
    async with db:
        assert await db.get("k") is None  # nothing survives a close


async def test_open_is_counted(db_path: str) -> None:
    db = DB(db_path)
    async with db:
        async with db:
            await db.set("k", b"v")
        assert await db.get("k") == b"v"  # still open: one user left
    with pytest.raises(StoreError, match="closed"):
        await db.get("k")
    await db.close()  # closing a closed DB does nothing
    await db.open()
    assert await db.get("k") == b"v"  # a closed DB opens again
    await db.close()


async def test_closed_db_raises_store_error(db_path: str) -> None:
    db = DB(db_path)
    for call in (db.get("k"), db.set("k", b"v"), db.delete("k"), db.expire("k", 1), db.ttl("k"), db.sync()):
        with pytest.raises(StoreError):
            await call
    with pytest.raises(StoreError):
        len(db)
    with pytest.raises(StoreError):
        db.stats()
    with pytest.raises(StoreError):
        [k async for k in db.scan()]


async def test_stats_counts(db_path: str) -> None:
    async with DB(db_path, sync="always") as db:
        await db.set("a", b"x" * 10)
        await db.set("b", b"y")
        await db.delete("b")
        stats = db.stats()
        assert isinstance(stats, Stats)
        assert stats.keys == 1
        assert stats.file_size == os.path.getsize(db_path)
        assert stats.fsyncs >= 3
        assert stats.shrinks == 0
        await db.shrink()
        assert db.stats().shrinks == 1
        with pytest.raises(AttributeError):
            stats.keys = 5  # type: ignore[misc]


async def test_file_is_private_and_untouched_by_open_and_close(db_path: str) -> None:
    async with DB(db_path) as db:
        for i in range(50):
            await db.set(f"k{i}", os.urandom(20), ttl=3600 if i % 2 else None)
        await db.delete("k3")
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
    before = file_bytes(db_path)
    for _ in range(3):
        async with DB(db_path) as db:
            assert len(db) == 49
    assert file_bytes(db_path) == before


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda db: db.set("", b"v"), ValueError),
        (lambda db: db.set(b"k", b"v"), TypeError),
        (lambda db: db.set(1, b"v"), TypeError),
        (lambda db: db.set("\ud800", b"v"), ValueError),
        (lambda db: db.set("k" * 70000, b"v"), ValueError),
        (lambda db: db.set("k", "text"), TypeError),
        (lambda db: db.set("k", None), TypeError),
        (lambda db: db.set("k", b"v", ttl=0), ValueError),
        (lambda db: db.set("k", b"v", ttl=-1), ValueError),
        (lambda db: db.set("k", b"v", ttl=float("nan")), ValueError),
        (lambda db: db.set("k", b"v", ttl=float("inf")), ValueError),
        (lambda db: db.set("k", b"v", ttl=10**400), ValueError),
        (lambda db: db.set("k", b"v", ttl=True), TypeError),
        (lambda db: db.set("k", b"v", ttl="5"), TypeError),
        (lambda db: db.expire("k", 0), ValueError),
        (lambda db: db.expire("k", False), TypeError),
        (lambda db: db.get(""), ValueError),
        (lambda db: db.get(None), TypeError),
        (lambda db: db.delete(5), TypeError),
        (lambda db: db.ttl(b"k"), TypeError),
    ],
)
async def test_bad_arguments_are_refused_and_write_nothing(db_path: str, call, error) -> None:  # type: ignore[no-untyped-def]
    async with DB(db_path) as db:
        size = db.stats().file_size
        with pytest.raises(error):
            await call(db)
        assert db.stats().file_size == size
        assert len(db) == 0


def test_bad_options_are_refused(db_path: str) -> None:
    with pytest.raises(ValueError, match="sync"):
        DB(db_path, sync="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DB(db_path, cleanup_interval=0)
    with pytest.raises(ValueError):
        DB(db_path, lock_timeout=-1)
    with pytest.raises(ValueError):
        DB(db_path, autoshrink_percentage=-5)
    with pytest.raises(ValueError, match="shared"):
        DB(":memory:", shared=True)


def test_one_db_under_asyncio_then_trio_then_asyncio(db_path: str) -> None:
    db = DB(db_path)

    async def step(n: int) -> None:
        await db.open()  # opened on one loop, used and closed on others
        await db.set(f"k{n}", str(n).encode())
        assert await db.get(f"k{n - 1}") == (str(n - 1).encode() if n else None)

    for n, backend in enumerate(["asyncio", "trio", "asyncio", "trio"]):
        anyio.run(step, n, backend=backend)

    async def finish() -> dict[str, bytes]:
        state = await contents(db)
        for _ in range(4):
            await db.close()
        return state

    assert anyio.run(finish) == {f"k{n}": str(n).encode() for n in range(4)}
    assert not db._open


async def test_concurrent_writers_on_one_key_leave_file_and_memory_agreeing(db_path: str) -> None:
    db = DB(db_path)
    async with db:
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(db.set, "same", str(i).encode())
        final = await db.get("same")
    async with DB(db_path) as db:
        assert await db.get("same") == final


async def test_set_with_an_absolute_expiry(db_path: str) -> None:
    clock = FakeClock()
    db = DB(db_path)
    db._clock = clock
    async with db:
        await db.set("k", b"v", expire_at=clock.now + 40)
        assert await db.ttl("k") == pytest.approx(40)
        await db.set("past", b"v", expire_at=clock.now - 1)
        assert await db.get("past") is None
        with pytest.raises(TypeError):
            await db.set("k", b"v", ttl=5, expire_at=clock.now + 5)
        with pytest.raises(ValueError):
            await db.set("k", b"v", expire_at=float("nan"))
        with pytest.raises(TypeError):
            await db.set("k", b"v", expire_at="soon")  # type: ignore[arg-type]


async def test_update_reads_and_writes_atomically(db_path: str) -> None:
    async with DB(db_path) as db:
        assert await db.update("n", lambda old: None) is False
        assert await db.get("n") is None

        def increment(old: bytes | None) -> tuple[bytes, float | None]:
            return str(int(old or b"0") + 1).encode(), None

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(db.update, "n", increment)
        assert await db.get("n") == b"200"

        def boom(old: bytes | None) -> tuple[bytes, float | None]:
            raise RuntimeError("no")

        size = db.stats().file_size
        with pytest.raises(RuntimeError):
            await db.update("n", boom)
        assert db.stats().file_size == size
    async with DB(db_path) as db:
        assert await db.get("n") == b"200"


async def test_no_write_path_stores_a_value_it_could_not_read_back(db_path: str) -> None:
    from buntsession.engine import format as fmt

    big = b"x" * (fmt.MAX_VALUE_SIZE + 1)
    async with DB(db_path) as db:
        await db.set("small", b"kept")
        size = db.stats().file_size
        with pytest.raises(ValueError, match="over the limit"):
            await db.set("k", big)
        with pytest.raises(ValueError, match="over the limit"):
            await db.set("k", bytearray(big))
        with pytest.raises(ValueError, match="over the limit"):
            await db.update("k", lambda _: (big, None))
        with pytest.raises(ValueError, match="over the limit"):
            await db.update("small", lambda _: (memoryview(big), None))
        assert db.stats().file_size == size
        assert await db.get("small") == b"kept"
        assert await db.get("k") is None
    async with DB(db_path) as db:  # the file still opens, with what was written
        assert await contents(db) == {"small": b"kept"}


@pytest.mark.parametrize("sync", ["never", "always"])
async def test_update_edges_on_the_fast_and_the_general_path(db_path: str, sync: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`update` has a fast path (one thread, nothing due: `sync="never"` here) and the general one (`"always"`,
    shared mode, another thread...): both give every edge the same answer."""
    import math

    clock = FakeClock()
    db = DB(db_path, sync=sync)  # type: ignore[arg-type]
    db._clock = clock
    general_calls = 0
    general = DB._write

    async def counting_write(self: DB, *args: object) -> bool:
        nonlocal general_calls
        general_calls += 1
        return await general(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(DB, "_write", counting_write)
    async with db:
        seen: list[bytes | None] = []

        def record_and(result: tuple[object, object] | None) -> object:
            def change(old: bytes | None) -> object:
                seen.append(old)
                return result
            return change

        # An absent key: change sees None; returning None writes nothing.
        size = db.stats().file_size
        assert await db.update("k", record_and(None)) is False  # type: ignore[arg-type]
        assert seen == [None] and db.stats().file_size == size and await db.get("k") is None
        # A value and an absolute expiry (an int is a number of seconds too); a memoryview comes back as bytes.
        assert await db.update("k", record_and((memoryview(b"v1"), int(clock.now) + 10))) is True  # type: ignore[arg-type]
        assert await db.get("k") == b"v1" and type(await db.get("k")) is bytes
        assert await db.ttl("k") == pytest.approx(10)
        assert await db.update("k", record_and((b"v2", None))) is True  # type: ignore[arg-type]
        assert seen[-1] == b"v1" and await db.ttl("k") is None
        # An expired key is absent to change.
        await db.set("old", b"stale", ttl=5)
        clock.advance(6)
        assert await db.update("old", record_and(None)) is False  # type: ignore[arg-type]
        assert seen[-1] is None
        # Errors: from change, a value over the cap or not bytes-like, an expiry that is no finite number.
        size = db.stats().file_size

        def boom(old: bytes | None) -> tuple[bytes, float | None]:
            raise RuntimeError("no")

        from buntsession.engine import format as fmt

        with pytest.raises(RuntimeError):
            await db.update("k", boom)
        for bad, error in [((b"x" * (fmt.MAX_VALUE_SIZE + 1), None), ValueError), (("text", None), TypeError),
                           ((b"v", math.nan), ValueError), ((b"v", math.inf), ValueError),
                           ((b"v", True), TypeError), ((b"v", "soon"), TypeError)]:
            with pytest.raises(error):
                await db.update("k", record_and(bad))  # type: ignore[arg-type]
        assert db.stats().file_size == size and await db.get("k") == b"v2"
        # Nothing was left half done: the next write takes its step as usual.
        assert await db.update("k", record_and((b"v3", clock.now + 60))) is True  # type: ignore[arg-type]
        assert await db.get("k") == b"v3"
        clock.advance(61)
        assert await db.get("k") is None
    # Which path ran: none of the updates above went the general way on the fast path's DB.
    assert (general_calls == 0) if sync == "never" else (general_calls >= 10)
    async with DB(db_path) as db:
        db._clock = clock
        assert await contents(db) == {}
    with pytest.raises(StoreError, match="closed"):
        await db.update("k", lambda old: (b"v", None))
