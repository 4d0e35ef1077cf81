"""PostgresStore on a real PostgreSQL server: exact values, the row, expiry and its cleanup, the merge across
hosts, identifiers, pool ownership, outages. (The whole session suite also runs on it: see
test_middleware.py's store_kind fixture.) asyncpg runs on asyncio only."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from buntsession import SessionMiddleware, StoreError
from buntsession.codec import Meta, decode_record, encode_record
from buntsession.merge import Update
from buntsession.postgres import PostgresStore, ddl
from buntsession.session import store_key


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # asyncpg runs on asyncio only

MOMENT = datetime(2026, 12, 5, 10, 30, 15, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30)))


async def write(request: Request) -> JSONResponse:
    s = request.session
    s.put_int("big", 2**70 + 1)
    s.put_float("tenth", 0.1 + 0.2)
    s.put_bytes("raw", b"\x00\xff binary")
    s.put_time("when", MOMENT)
    s.put_string("nul", "a\x00b")
    s.put_object("nested", {"ints": [2**64, -(2**63)], "f": 1e-300, "text": "\x00"})
    return JSONResponse({})


async def read(request: Request) -> JSONResponse:
    s = request.session
    return JSONResponse({"big": str(s.get_int("big")), "tenth": repr(s.get_float("tenth")),
                         "raw": repr(s.get_bytes("raw")), "when": repr(s.get_time("when")),
                         "nul": repr(s.get_string("nul")), "nested": repr(s.get_object("nested"))})


EXPECTED = {"big": str(2**70 + 1), "tenth": repr(0.1 + 0.2), "raw": repr(b"\x00\xff binary"), "when": repr(MOMENT),
            "nul": repr("a\x00b"), "nested": repr({"ints": [2**64, -(2**63)], "f": 1e-300, "text": "\x00"})}


def app_on(store: PostgresStore, **options: Any) -> SessionMiddleware:
    return SessionMiddleware(Starlette(routes=[Route("/write", write), Route("/read", read)]), store=store,
                             **options)


def table() -> str:
    return f"t_{uuid.uuid4().hex}"


def factory(server: Any, **options: Any) -> Any:
    return lambda: asyncpg.create_pool(server.dsn, min_size=1, max_size=4, **options)


def http(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def update(data: dict[str, Any], expires_at: float, **options: Any) -> Update:
    return Update(data, Meta(time.time(), expires_at), expires_at, **options)


@pytest.mark.anyio
async def test_values_stay_exact_and_the_callers_pool_stays_open(postgres_server: Any) -> None:
    pool = await asyncpg.create_pool(postgres_server.dsn, min_size=1, max_size=2)
    try:
        store = PostgresStore(pool, table=table())
        async with store, http(app_on(store)) as client:  # the store opened as a lifespan does
            await client.get("/write")
            assert (await client.get("/read")).json() == EXPECTED
        assert not pool.is_closing()  # the caller's pool: never closed by the store
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()


def test_a_pool_used_on_another_event_loop_is_a_store_error(postgres_server: Any) -> None:
    async def make() -> Any:
        return await asyncpg.create_pool(postgres_server.dsn, min_size=1, max_size=1)

    loop = asyncio.new_event_loop()
    try:
        pool = loop.run_until_complete(make())
        store = PostgresStore(pool, table=table())
        with pytest.raises(StoreError, match="another event loop"):
            anyio.run(store.find, "k")
        loop.run_until_complete(pool.close())
    finally:
        loop.close()


def test_a_session_is_a_row_with_an_absolute_expiry(postgres_server: Any) -> None:
    name = table()
    made: list[Any] = []

    async def make() -> Any:
        made.append(await asyncpg.create_pool(postgres_server.dsn, min_size=1, max_size=2))
        return made[-1]

    store = PostgresStore(make, table=name)
    with TestClient(app_on(store, max_age=3600)) as client:
        started = time.time()
        token = client.get("/write").headers["set-cookie"].split(";")[0].split("=", 1)[1]
        key = store_key(token)
        row = postgres_server.psql(
            f"SELECT created_at, ends_at, remember IS NULL, extract(epoch FROM expires_at), user_id IS NULL, "
            f"data->>'big', data->>'tenth', data->>'raw' FROM {name} WHERE key = '{key}'").split("|")
        created, end, expires = float(row[0]), float(row[1]), float(row[3])
        assert started <= created <= end - 3600 + 1
        assert abs(expires - end) < 1e-5  # the absolute end, to the microsecond
        assert row[2] == row[4] == "t"  # remember-me left to the middleware; user_id reserved, unused
        assert row[5:] == ["j" + str(2**70 + 1), "j" + repr(0.1 + 0.2), "bAP8gYmluYXJ5"]
        client.get("/write")  # a later write keeps the same end
        assert float(postgres_server.psql(f"SELECT extract(epoch FROM expires_at) FROM {name}")) == expires
    assert len(made) == 1 and made[0].is_closing()  # the pool it made, it closed at shutdown
    # the indexes of the DDL are there
    indexes = postgres_server.psql(f"SELECT indexname FROM pg_indexes WHERE tablename = '{name}' ORDER BY 1")
    assert indexes.split() == [f"{name}_expires_at", f"{name}_pkey", f"{name}_user_id"]


@pytest.mark.anyio
async def test_expired_rows_are_never_returned_nor_brought_back(postgres_server: Any) -> None:
    name = table()
    store = PostgresStore(factory(postgres_server), table=name, cleanup_interval=3600)
    async with store:
        end = time.time() + 600
        assert await store.merge("k", update({"a": 1}, end, create=True))
        record, expires = await store.find_with_expiry("k") or (b"", 0.0)
        assert decode_record(record)[1] == {"a": 1}
        assert abs(expires - end) < 1e-5
        postgres_server.psql(f"UPDATE {name} SET expires_at = now() - interval '1 second'")
        assert await store.find("k") is None  # still in the table, never returned
        assert await store.find_with_expiry("k") is None
        assert not await store.touch("k", end)
        assert not await store.merge("k", update({"b": 2}, end, base=record, put={"b"}))
        assert postgres_server.psql(f"SELECT count(*) FROM {name} WHERE expires_at > now()") == "0"
        assert postgres_server.psql(f"SELECT data::text FROM {name}") == '{"a": "j1"}'  # untouched


@pytest.mark.anyio
async def test_a_destroyed_session_is_never_recreated(postgres_server: Any) -> None:
    store = PostgresStore(factory(postgres_server), table=table())
    async with store:
        end = time.time() + 600
        await store.commit("k", encode_record(Meta(time.time(), end), {"a": "x"}), end)
        base = await store.find("k")
        await store.delete("k")
        await store.delete("k")  # a missing key: nothing to do
        assert not await store.merge("k", update({"a": "x", "b": "y"}, end, base=base, put={"b"}))
        assert not await store.touch("k", end + 10)
        assert await store.find("k") is None
        assert await store.merge("k", update({"c": 3}, end, create=True))  # a new session may be created
        found = await store.find("k")
        assert found is not None and decode_record(found)[1] == {"c": 3}


@pytest.mark.anyio
async def test_merges_from_several_hosts_keep_each_others_keys(postgres_server: Any) -> None:
    name = table()
    one = PostgresStore(factory(postgres_server), table=name)
    two = PostgresStore(factory(postgres_server), table=name)  # another host: its own pool
    async with one, two:
        end = time.time() + 600
        assert await one.merge("k", update({"a": 1, "b": 2, "gone": 0}, end, create=True))
        base = await one.find("k")
        assert await two.merge("k", update({"a": 1, "b": 2, "x": "two"}, end, base=base, put={"x"},
                                           removed={"gone"}))
        # one's view is stale (it does not know of x): its own changes only go onto what is stored
        assert await one.merge("k", update({"a": 10, "b": 2, "gone": 0}, end, base=base, put={"a"}, removed={"b"}))
        found = await two.find("k")
        assert found is not None and decode_record(found)[1] == {"a": 10, "x": "two"}
        # clear() drops every stored key, then the request's own keys go on
        assert await two.merge("k", update({"only": True}, end, base=found, put={"only"}, cleared=True))
        found = await one.find("k")
        assert found is not None and decode_record(found)[1] == {"only": True}
        # many overlapping merges, each its own key: none lost
        async with anyio.create_task_group() as tg:
            for i in range(40):
                store = one if i % 2 else two
                tg.start_soon(store.merge, "k", update({f"k{i}": i}, end, base=found, put={f"k{i}"}))
        found = await one.find("k")
        assert found is not None and decode_record(found)[1] == {"only": True, **{f"k{i}": i for i in range(40)}}
        # remember-me and the metadata go with a merge that changes them, and only then
        meta = Meta(123.0, end, True)
        assert await one.merge("k", Update({}, meta, end, base=found, meta_changed=True, cleared=True))
        assert decode_record(await two.find("k") or b"")[0] == meta
        assert await one.merge("k", Update({"z": 1}, Meta(1.0, 2.0), end, base=found, put={"z"}))
        assert decode_record(await two.find("k") or b"") == (meta, {"z": 1})


@pytest.mark.anyio
async def test_expired_rows_are_deleted_in_batches_by_the_calls(postgres_server: Any) -> None:
    name = table()
    store = PostgresStore(factory(postgres_server), table=name, cleanup_interval=3600, cleanup_batch=10)
    async with store:  # the first call makes the table (and deletes nothing: it is empty)
        await store.commit("live", encode_record(Meta(time.time(), time.time() + 600), {}), time.time() + 600)
        postgres_server.psql(
            f"INSERT INTO {name} (key, created_at, ends_at, data, expires_at) SELECT 'old' || i, 0, 0, '{{}}', "
            f"now() - interval '1 minute' FROM generate_series(1, 25) AS i")

        def left() -> int:
            return int(postgres_server.psql(f"SELECT count(*) FROM {name}"))

        assert left() == 26
        store._next_cleanup = 0.0  # as if the interval had passed
        counts = []
        for _ in range(5):
            await store.find("live")
            counts.append(left())
        # 10 a call while batches come back full, then none until the interval has passed again
        assert counts == [16, 6, 1, 1, 1]
        assert await store.find("live") is not None
        postgres_server.psql(f"UPDATE {name} SET expires_at = now() - interval '1 second'")
        assert await store.delete_expired() == 1
        assert left() == 0


def test_table_names_are_quoted_identifiers(postgres_server: Any) -> None:
    postgres_server.psql('CREATE SCHEMA IF NOT EXISTS "odd schema"')
    name = f'we"ird; DROP TABLE x; -- {uuid.uuid4().hex[:8]}'
    store = PostgresStore(factory(postgres_server), table=name, schema="odd schema")
    client = TestClient(app_on(store))
    client.get("/write")
    assert client.get("/read").json() == EXPECTED
    quoted = '"odd schema"."' + name.replace('"', '""') + '"'
    assert postgres_server.psql(f"SELECT count(*) FROM {quoted}") == "1"
    for bad in ("", "a\x00b", "x" * 60):  # empty, NUL, too long once the index suffix is added
        with pytest.raises(ValueError, match="identifier"):
            PostgresStore(factory(postgres_server), table=bad)
    with pytest.raises(ValueError, match="timeout"):
        PostgresStore(factory(postgres_server), timeout=0)
    with pytest.raises(TypeError, match="pool"):
        PostgresStore("postgresql://")
    # the DDL of the README, run by hand, makes the table the store uses
    other = table()
    postgres_server.psql(ddl(other))
    postgres_server.psql(ddl(other))  # idempotent
    client = TestClient(app_on(PostgresStore(factory(postgres_server), table=other)))
    client.get("/write")
    assert postgres_server.psql(f"SELECT count(*) FROM {other}") == "1"


@pytest.mark.anyio
async def test_hosts_opening_at_once_make_the_table_once(postgres_server: Any) -> None:
    name = table()
    stores = [PostgresStore(factory(postgres_server), table=name) for _ in range(4)]
    async with anyio.create_task_group() as tg:
        for store in stores:
            tg.start_soon(store.__aenter__)
    for store in stores:
        assert await store.find("nothing") is None
        await store.__aexit__(None, None, None)


def test_an_unreachable_server_gives_503_within_the_timeout_and_recovers(postgres_server: Any) -> None:
    store = PostgresStore(factory(postgres_server, timeout=1), table=table(), timeout=1.0)
    with TestClient(app_on(store)) as client:
        client.get("/write")
        postgres_server.stop()
        try:
            for _ in range(3):
                started = time.monotonic()
                assert client.get("/read").status_code == 503
                assert time.monotonic() - started < 3
        finally:
            postgres_server.start()
        assert client.get("/read").json() == EXPECTED  # back by itself, and the data was kept


def test_a_failing_open_fails_the_startup(postgres_server: Any) -> None:
    store = PostgresStore(lambda: asyncpg.create_pool("postgresql://postgres@127.0.0.1:1/postgres"), timeout=0.5)
    with pytest.raises(StoreError), TestClient(app_on(store)):
        pass


def test_a_stalled_server_gives_503_within_the_timeout(postgres_server: Any) -> None:
    store = PostgresStore(factory(postgres_server, timeout=1), table=table(), timeout=1.0)
    with TestClient(app_on(store)) as client:
        client.get("/write")
        assert postgres_server.process is not None
        postgres_server.signal_all(signal.SIGSTOP)  # the postmaster and every backend
        try:
            started = time.monotonic()
            assert client.get("/read").status_code == 503
            assert time.monotonic() - started < 3
        finally:
            postgres_server.signal_all(signal.SIGCONT)
        deadline = time.monotonic() + 5
        while client.get("/read").status_code != 200:  # the cancelled call's connection is being reset
            assert time.monotonic() < deadline
        assert client.get("/read").json() == EXPECTED


def test_a_restart_in_the_middle_of_a_run_gives_no_500(postgres_server: Any) -> None:
    store = PostgresStore(factory(postgres_server, timeout=1), table=table(), timeout=1.0)
    statuses: list[int] = []
    with TestClient(app_on(store)) as client:
        for i in range(60):
            if i == 20:
                postgres_server.stop()
            if i == 40:
                postgres_server.start()
            statuses.append(client.get("/write" if i % 2 else "/read").status_code)
    assert set(statuses[:20]) == {200}
    assert set(statuses[20:40]) == {503}
    assert set(statuses[40:]) == {200}



def test_the_docs_give_the_ddl_the_store_runs() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "stores.md").read_text()
    assert "```sql\n" + ddl() + "```" in page


def test_under_trio_it_is_a_store_error_not_a_crash(postgres_server: Any) -> None:
    store = PostgresStore(factory(postgres_server), table=table())
    with pytest.raises(StoreError, match="asyncio only"):
        anyio.run(store.find, "k", backend="trio")
    client = TestClient(app_on(store), backend="trio")
    assert client.get("/write").status_code == 503


def test_the_idle_deadline_moves_by_an_expiry_only_update(postgres_server: Any) -> None:
    from helpers import FakeClock

    name = table()
    clock = FakeClock(time.time())
    app = app_on(PostgresStore(factory(postgres_server), table=name), max_age=1000, idle_timeout=100)
    app.lifecycle.clock = clock
    with TestClient(app) as client:
        client.get("/write")

        def row() -> list[str]:
            return postgres_server.psql(f"SELECT extract(epoch FROM expires_at), data::text FROM {name}").split("|")

        expires, data = row()
        assert abs(float(expires) - (clock.now + 100)) < 1
        clock.advance(5)  # less than a tenth of the idle timeout: nothing written
        assert client.get("/read").json() == EXPECTED
        assert row() == [expires, data]
        clock.advance(30)
        response = client.get("/read")
        assert response.json() == EXPECTED and "set-cookie" not in response.headers
        moved, same = row()
        assert abs(float(moved) - (clock.now + 100)) < 1 and same == data  # the expiry alone moved
        clock.advance(101)  # idle for longer than the timeout: gone, whatever the server's clock says
        assert client.get("/read").json()["big"] == "0"  # a fresh, empty session
