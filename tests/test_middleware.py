"""SessionMiddleware end to end in-process: both stores, TestClient and httpx ASGITransport, asyncio and trio."""

from __future__ import annotations

import logging
import re
import secrets
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from helpers import FakeClock, FaultyOps
from session_app import POSTGRES_DSN, REDIS_PORT, late_errors, make_app, make_store
from starlette.testclient import TestClient

from buntsession import DB, BuntStore, MemoryStore, SessionMiddleware
from buntsession.fastapi import SessionDep
from buntsession.postgres import PostgresStore
from buntsession.session import store_key

POSTGRES_SERVER: list[Any] = []  # the conftest's PostgresServer, when a test runs on PostgreSQL

COOKIE = re.compile(r"session=([^;]*);")


@pytest.fixture(params=["bunt", "memory", "redis", "redis-cluster", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """Every test that takes it runs on each store: one suite, not a copy per store."""
    kind = str(request.param)
    if kind.startswith("redis") or kind == "postgres":
        params = request.node.callspec.params
        if "trio" in (params.get("anyio_backend"), params.get("backend")):
            pytest.skip("asyncpg runs on asyncio only" if kind == "postgres" else "redis.asyncio runs on asyncio only")
    if kind == "redis":
        REDIS_PORT[:] = [request.getfixturevalue("redis_server").port]
    if kind == "redis-cluster":
        REDIS_PORT[:] = [request.getfixturevalue("redis_cluster").ports[0]]
    if kind == "postgres":
        POSTGRES_SERVER[:] = [request.getfixturevalue("postgres_server")]
        POSTGRES_DSN[:] = [POSTGRES_SERVER[0].dsn]
    return kind


def token_of(response: httpx.Response) -> str:
    match = COOKIE.search(response.headers["set-cookie"])
    assert match is not None
    return match[1]


def records(store: Any) -> int:
    if isinstance(store, BuntStore):
        return len(store.db)
    if isinstance(store, MemoryStore):
        return len(store)
    if isinstance(store, PostgresStore):
        server = POSTGRES_SERVER[0]
        if server.psql(f"SELECT to_regclass('\"{store.table}\"') IS NULL") == "t":
            return 0  # never used: the table was not made
        return int(server.psql(f'SELECT count(*) FROM "{store.table}" WHERE expires_at > now()'))
    import redis
    import redis.asyncio

    if isinstance(store.client, redis.asyncio.RedisCluster):
        cluster = redis.RedisCluster(host="127.0.0.1", port=REDIS_PORT[0])
        return len(cluster.keys(store.prefix + "*", target_nodes=redis.RedisCluster.ALL_NODES))
    return len(redis.Redis(port=REDIS_PORT[0]).keys(store.prefix + "*"))


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_put_and_get_with_testclient_outside_and_inside_with(store_kind: str, tmp_path: Path, backend: str) -> None:
    app = make_app(make_store(store_kind, str(tmp_path / "s.db")))
    client = TestClient(app, backend=backend)  # no lifespan: every request on a new event loop
    assert client.get("/get").json() == {}
    assert client.get("/put?a=1&b=2").json() == {"a": "1", "b": "2"}
    assert client.get("/get").json() == {"a": "1", "b": "2"}
    with TestClient(app, backend=backend, cookies=client.cookies) as inside:
        assert inside.get("/get").json() == {"a": "1", "b": "2"}
        inside.get("/put?c=3")
        assert inside.get("/get").json() == {"a": "1", "b": "2", "c": "3"}
    # After the lifespan closed the store, a request without lifespan opens it again.
    assert client.get("/get").json() == {"a": "1", "b": "2", "c": "3"}


@pytest.mark.anyio
async def test_httpx_asgi_transport_without_lifespan(store_kind: str, tmp_path: Path) -> None:
    app = make_app(make_store(store_kind, str(tmp_path / "s.db")), secret_key="k")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert (await client.get("/incr")).json() == 1
        assert (await client.get("/incr")).json() == 2
        assert (await client.get("/get")).json() == {"n": 2}


def test_requests_that_change_nothing_store_nothing(store_kind: str, tmp_path: Path) -> None:
    store = make_store(store_kind, str(tmp_path / "s.db"))
    client = TestClient(make_app(store))
    client.get("/none")  # opens the store
    size = (tmp_path / "s.db").stat().st_size if store_kind == "bunt" else 0
    for i in range(300):
        client.cookies = {} if i % 2 else {"session": secrets.token_urlsafe(32)}
        for path in ("/none", "/get", "/peek?key=x"):
            response = client.get(path)
            assert response.status_code == 200
            assert "set-cookie" not in response.headers
    assert records(store) == 0
    if store_kind == "bunt":
        assert (tmp_path / "s.db").stat().st_size == size


def test_a_clients_token_is_never_adopted(store_kind: str, tmp_path: Path) -> None:
    store = make_store(store_kind, str(tmp_path / "s.db"))
    chosen = secrets.token_urlsafe(32)
    client = TestClient(make_app(store), cookies={"session": chosen})
    issued = token_of(client.get("/put?a=1"))
    assert issued != chosen
    assert anyio.run(store.find, store_key(chosen)) is None
    assert anyio.run(store.find, store_key(issued)) is not None


def test_the_store_key_is_the_hash_of_the_token(tmp_path: Path) -> None:
    store = make_store("bunt", str(tmp_path / "s.db"))
    client = TestClient(make_app(store))
    token = token_of(client.get("/put?a=1"))
    keys = anyio.run(lambda: _keys(store))
    assert keys == [f"session:{store_key(token)}"]
    assert token.encode() not in (tmp_path / "s.db").read_bytes()


async def _keys(store: Any) -> list[str]:
    return [key async for key in store.db.scan()]


def test_cookie_attributes_on_create_renew_and_destroy() -> None:
    client = TestClient(make_app(MemoryStore()))
    created = client.get("/put?a=1").headers["set-cookie"]
    assert re.fullmatch(
        r"session=[A-Za-z0-9_-]{43}; path=/; Max-Age=1209600; expires=[^;]+ GMT; httponly; samesite=lax", created)
    assert "secure" not in created
    renewed = client.post("/login").headers["set-cookie"]
    assert re.fullmatch(r"session=[A-Za-z0-9_-]{43}; path=/; Max-Age=1209600; expires=[^;]+; httponly; samesite=lax",
                        renewed)
    assert token_of(client.post("/login")) != COOKIE.search(renewed)[1]  # type: ignore[index]
    destroyed = client.post("/logout").headers["set-cookie"]
    assert destroyed == ("session=null; path=/; expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; "
                         "httponly; samesite=lax")

    https = TestClient(make_app(MemoryStore(), domain="example.com", partitioned=True, same_site="strict"),
                       base_url="https://testserver")
    cookie = https.get("/put?a=1").headers["set-cookie"]
    assert cookie.endswith("; httponly; samesite=strict; secure; domain=example.com; partitioned")


def test_host_prefixed_cookie_rules() -> None:
    with pytest.raises(ValueError, match="__Host-"):
        make_app(MemoryStore(), session_cookie="__Host-id", path="/app")
    with pytest.raises(ValueError, match="__Host-"):
        make_app(MemoryStore(), session_cookie="__Host-id", domain="example.com")
    client = TestClient(make_app(MemoryStore(), session_cookie="__Host-id"))
    cookie = client.get("/put?a=1").headers["set-cookie"]
    assert cookie.startswith("__Host-id=") and "; secure" in cookie and "domain" not in cookie
    with pytest.raises(ValueError, match="cookie name"):
        make_app(MemoryStore(), session_cookie="bad name;")


def test_signed_cookies_reject_forgeries_and_rotate_keys() -> None:
    store = MemoryStore()
    old_client = TestClient(make_app(store, secret_key="old"))
    old_client.get("/put?a=1")
    signed = old_client.cookies["session"]
    token, signature = signed.split(".")
    rotated = make_app(store, secret_key=["new", "old"])
    assert TestClient(rotated, cookies={"session": signed}).get("/get").json() == {"a": "1"}
    # (Not the last character: base64's spare low bits there let some edits decode to the same bytes.)
    forged = [f"{token}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}", token,
              f"{secrets.token_urlsafe(32)}.{signature}"]
    for cookie in forged:
        assert TestClient(rotated, cookies={"session": cookie}).get("/get").json() == {}
    assert TestClient(make_app(store, secret_key="new"), cookies={"session": signed}).get("/get").json() == {}
    read_only = TestClient(rotated, cookies={"session": signed}).get("/get")
    assert token_of(read_only).split(".")[0] == token  # a read re-signs too, so the old key can go
    assert "set-cookie" not in TestClient(rotated, cookies={"session": token_of(read_only)}).get("/get").headers
    resigned = token_of(TestClient(rotated, cookies={"session": signed}).get("/put?b=2"))
    assert resigned != signed  # a change re-signs with the first key
    assert TestClient(make_app(store, secret_key="new"), cookies={"session": resigned}).get("/get").json() == {
        "a": "1", "b": "2"}


def test_absolute_lifetime_with_an_injected_clock(store_kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    app = make_app(make_store(store_kind, str(tmp_path / "s.db"), clock), clock, max_age=100)
    client = TestClient(app)
    client.get("/put?a=1")
    clock.advance(60)
    assert client.get("/get").json() == {"a": "1"}
    assert "set-cookie" not in client.get("/put?b=2").headers  # same token, same end: no cookie to send
    assert "Max-Age=40;" in client.get("/remember?on=1").headers["set-cookie"]  # time left, not a new 100
    clock.advance(41)
    assert client.get("/get").json() == {}
    client.get("/put?c=3")
    clock.advance(90)
    client.post("/login")  # renewing restarts the lifetime
    clock.advance(90)
    assert client.get("/get").json() == {"c": "3", "user": "alice"}


def test_idle_timeout_moves_with_activity_and_writes_rarely(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store("bunt", str(tmp_path / "s.db"), clock)
    client = TestClient(make_app(store, clock, max_age=1000, idle_timeout=100))
    cookie = client.get("/put?a=1").headers["set-cookie"]
    assert "Max-Age=1000;" in cookie  # the cookie follows the absolute end; the server enforces idleness
    size = (tmp_path / "s.db").stat().st_size
    clock.advance(5)
    client.get("/get")
    assert (tmp_path / "s.db").stat().st_size == size  # within a tenth of the timeout: nothing written
    for _ in range(9):
        clock.advance(60)
        response = client.get("/get")
        assert response.json() == {"a": "1"} and "set-cookie" not in response.headers
    grown = (tmp_path / "s.db").stat().st_size - size
    expiry_only_record = 28 + len("session:") + 64  # a record header and the key, no value
    assert grown == 9 * expiry_only_record
    clock.advance(101)
    assert client.get("/get").json() == {}


def test_idle_timeout_cannot_outlive_the_absolute_end() -> None:
    clock = FakeClock()
    client = TestClient(make_app(MemoryStore(clock), clock, max_age=150, idle_timeout=100))
    client.get("/put?a=1")
    for _ in range(3):
        clock.advance(50)
        client.get("/get")
    clock.advance(1)
    assert client.get("/get").json() == {}


def test_idle_timeout_needs_a_capable_store() -> None:
    class PlainStore:
        async def find(self, key: str) -> bytes | None:
            return None

        async def commit(self, key: str, data: bytes, expires_at: float) -> None: ...

        async def delete(self, key: str) -> None: ...

    with pytest.raises(ValueError, match="idle_timeout"):
        make_app(PlainStore(), idle_timeout=10)  # type: ignore[arg-type]
    make_app(PlainStore())  # type: ignore[arg-type]


def test_browser_session_cookies_and_remember_me(store_kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(store_kind, str(tmp_path / "s.db"), clock)
    client = TestClient(make_app(store, clock, max_age=None))
    cookie = client.get("/put?a=1").headers["set-cookie"]
    assert "Max-Age" not in cookie and "expires" not in cookie
    assert "Max-Age=1209600" in client.get("/remember?on=1").headers["set-cookie"]
    clock.advance(14 * 24 * 3600 + 1)  # the server keeps a browser-session session 14 days at most
    assert client.get("/get").json() == {}

    persistent = TestClient(make_app(store, clock))
    persistent.get("/put?a=1")
    assert "Max-Age" not in persistent.get("/remember?on=0").headers["set-cookie"]


def test_max_age_zero_or_less_is_a_session_that_already_ended(store_kind: str, tmp_path: Path) -> None:
    store = make_store(store_kind, str(tmp_path / "s.db"))
    for max_age in (0, -1):
        client = TestClient(make_app(store, max_age=max_age))
        response = client.get("/put?a=1")
        assert "; Max-Age=0; " in response.headers["set-cookie"]
        replay = TestClient(make_app(store, max_age=max_age), cookies={"session": token_of(response)})
        assert replay.get("/get").json() == {}
    assert records(store) == 0


def test_metadata(store_kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    client = TestClient(make_app(make_store(store_kind, str(tmp_path / "s.db"), clock), clock, max_age=600))
    assert client.get("/meta").json() == {"token": None, "created_at": None, "expires_at": None,
                                          "status": "unmodified"}
    client.get("/put?a=1")
    clock.advance(10)
    meta = client.get("/meta").json()
    assert meta["created_at"] == pytest.approx(clock.now - 10)
    assert meta["expires_at"] == pytest.approx(clock.now + 590)
    assert meta["token"] == client.cookies["session"]


def test_nested_changes_are_stored(store_kind: str, tmp_path: Path) -> None:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def add(request: Any) -> JSONResponse:
        cart = request.session.setdefault("cart", [])
        cart.append(request.query_params["item"])  # changed in place, never assigned again
        return JSONResponse(cart)

    store = make_store(store_kind, str(tmp_path / "s.db"))
    client = TestClient(SessionMiddleware(Starlette(routes=[Route("/add", add)]), store=store))
    for item in ("apple", "pear", "fig"):
        client.get(f"/add?item={item}")
    assert client.get("/add?item=kiwi").json() == ["apple", "pear", "fig", "kiwi"]


def test_values_keep_their_types_through_a_restart(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    when = datetime(2026, 11, 30, 9, 30, 15, 123456, tzinfo=UTC)

    async def write(request: Any) -> JSONResponse:
        s = request.session
        s.put_string("s", "ü"), s.put_int("i", 2**64), s.put_float("f", 2.0), s.put_bool("b", False)
        s.put_bytes("y", b"\x00\xff"), s.put_time("t", when), s.put_object("o", {"l": [1, 1.5, None]})
        return JSONResponse({})

    async def read(request: Any) -> JSONResponse:
        s = request.session
        ok = (s.get_string("s") == "ü" and s.get_int("i") == 2**64 and type(s.get_float("f")) is float
              and s.get_bool("b") is False and s.get_bytes("y") == b"\x00\xff" and s.get_time("t") == when
              and s.get_object("o") == {"l": [1, 1.5, None]})
        return JSONResponse(ok)

    def serve() -> TestClient:
        app = Starlette(routes=[Route("/write", write), Route("/read", read)])
        return TestClient(SessionMiddleware(app, store=BuntStore(DB(str(tmp_path / "s.db")))))

    with serve() as first:
        token = token_of(first.get("/write"))
    with serve() as second:  # a new DB object: the file is read again
        second.cookies = {"session": token}
        assert second.get("/read").json() is True


@pytest.mark.anyio
async def test_overlapping_requests_keep_each_others_keys(store_kind: str, tmp_path: Path) -> None:
    app = make_app(make_store(store_kind, str(tmp_path / "s.db")))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        await client.get("/put?start=1")
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(client.get, f"/slow_put?key=k{i}&delay={(i % 7) / 100}")
        state = (await client.get("/get")).json()
    assert state == {"start": "1", **{f"k{i}": "slow" for i in range(50)}}


@pytest.mark.anyio
async def test_a_logout_racing_a_slow_request_is_not_undone(
    store_kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store(store_kind, str(tmp_path / "s.db"))
    app = make_app(store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        await client.get("/put?a=1")
        token = client.cookies["session"]
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.get, "/slow_put?key=late&delay=0.3")
            await anyio.sleep(0.1)
            await client.post("/logout")
        assert await store.find(store_key(token)) is None  # the slow request did not bring it back
        replay = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                   cookies={"session": token})
        assert (await replay.get("/get")).json() == {}
    assert any("destroyed or renewed meanwhile" in r.getMessage() for r in caplog.records)


def test_destroy_holds_even_when_the_app_fails(store_kind: str, tmp_path: Path) -> None:
    store = make_store(store_kind, str(tmp_path / "s.db"))
    for path in ("/destroy_then_fail", "/destroy_then_500"):
        client = TestClient(make_app(store), raise_server_exceptions=False)
        client.get("/put?a=1")
        token = client.cookies["session"]
        assert client.get(path).status_code == 500
        assert anyio.run(store.find, store_key(token)) is None


def test_a_5xx_response_commits_nothing(store_kind: str, tmp_path: Path) -> None:
    store = make_store(store_kind, str(tmp_path / "s.db"))
    client = TestClient(make_app(store))
    response = client.get("/put_then_500")
    assert response.status_code == 500 and "set-cookie" not in response.headers
    client.get("/put?a=1")
    client.get("/put_then_500")
    assert client.get("/get").json() == {"a": "1"}


def test_a_change_after_the_response_started_raises() -> None:
    late_errors.clear()
    client = TestClient(make_app(MemoryStore()))
    client.get("/change_after_start")
    assert client.get("/get").json() == {"early": "yes"}
    assert len(late_errors) == 1 and "after the response started" in str(late_errors[0])


def test_websocket_sees_the_session_read_only() -> None:
    client = TestClient(make_app(MemoryStore()))
    client.get("/put?a=1")
    with client.websocket_connect("/ws") as ws:
        reply = ws.receive_json()
    assert reply["session"] == {"a": "1"}
    assert "read-only" in reply["error"]
    assert client.get("/get").json() == {"a": "1"}


def test_vary_and_cache_control_headers() -> None:
    client = TestClient(make_app(MemoryStore()))
    assert "vary" not in client.get("/none").headers
    assert client.get("/get").headers["vary"] == "Cookie"
    written = client.get("/put?a=1")
    assert written.headers["vary"] == "Cookie" and written.headers["cache-control"] == "private"
    assert "cache-control" not in client.get("/get").headers


def test_store_failures_give_503_and_reads_keep_working(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = DB(str(tmp_path / "s.db"), sync="always")
    ops = FaultyOps()
    db._fileops = ops
    client = TestClient(make_app(BuntStore(db)))
    client.get("/put?a=1")
    ops.fail_fsyncs = 1
    failed = client.get("/put?b=2")
    assert failed.status_code == 503 and "set-cookie" not in failed.headers
    assert "Traceback" not in failed.text
    assert client.get("/get").status_code == 200  # the DB refuses writes, reads go on
    assert client.get("/put?c=3").status_code == 503  # until it is reopened
    per_request = [r for r in caplog.records if r.levelno >= logging.ERROR and r.module == "middleware"]
    assert len(per_request) == 2  # one line for each failed request, no traceback
    assert all("session store failed" in r.getMessage() and r.exc_info is None for r in per_request)


def test_logout_is_fsynced_before_the_response_under_everysec(tmp_path: Path) -> None:
    db = DB(str(tmp_path / "s.db"))  # everysec: only the background pass would fsync
    ops = FaultyOps()
    db._fileops = ops
    client = TestClient(make_app(BuntStore(db)))
    client.get("/put?a=1")
    before = ops.fsync_calls
    client.post("/logout")
    assert ops.fsync_calls > before
    client.get("/put?b=1")
    before = ops.fsync_calls
    client.post("/login")  # renewing kills the old token: durable too
    assert ops.fsync_calls > before


def test_default_store_is_shared_and_named_in_lock_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from buntsession import middleware

    path = tmp_path / "default.db"
    monkeypatch.setenv("BUNTSESSION_PATH", str(path))
    monkeypatch.setattr(middleware, "_DEFAULT", {})
    first, second = SessionMiddleware(make_app(MemoryStore())), SessionMiddleware(make_app(MemoryStore()))
    assert first.store is second.store
    assert isinstance(first.store, BuntStore) and first.store.db.path == str(path)

    async def hold_and_collide() -> int:
        async with DB(str(path)):
            monkeypatch.setattr(middleware, "_DEFAULT", {})
            app = make_app(None)  # type: ignore[arg-type]
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                return (await client.get("/get")).status_code

    with caplog.at_level(logging.ERROR, logger="buntsession"):
        assert anyio.run(hold_and_collide) == 503
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "default session store" in line and "BUNTSESSION_PATH" in line and "shared=True" in line


def test_lifespan_opens_and_closes_the_store(tmp_path: Path) -> None:
    db = DB(str(tmp_path / "s.db"))
    with TestClient(make_app(BuntStore(db))) as client:
        assert db._open
        client.get("/put?a=1")
    assert not db._open  # closed at shutdown: the file is free for the next process


def test_fastapi_session_dependency(tmp_path: Path) -> None:
    from fastapi import FastAPI

    app = FastAPI()
    app.add_middleware(SessionMiddleware, store=BuntStore(DB(str(tmp_path / "s.db"))), secret_key="k")

    @app.get("/count")
    async def count(session: SessionDep) -> int:
        session.put_int("n", session.get_int("n") + 1)
        return session.get_int("n")

    with TestClient(app) as client:
        assert [client.get("/count").json() for _ in range(3)] == [1, 2, 3]
        assert client.get("/count").headers["vary"] == "Cookie"

    bare = FastAPI()

    @bare.get("/x")
    async def x(session: SessionDep) -> None: ...

    with pytest.raises(RuntimeError, match="SessionMiddleware"):
        TestClient(bare).get("/x")


def test_timing_of_a_request_is_not_a_test(tmp_path: Path) -> None:
    # Guard against an accidental full-file fsync on every request: 200 writes finish in well under a minute.
    started = time.monotonic()
    client = TestClient(make_app(make_store("bunt", str(tmp_path / "s.db"))))
    for _ in range(200):
        client.get("/incr")
    assert client.get("/get").json() == {"n": 200}
    assert time.monotonic() - started < 60


def test_cookie_dates_are_formatted_as_the_standard_library_does() -> None:
    import email.utils
    import random

    from buntsession.middleware import _http_date

    rng = random.Random(3)
    for moment in [0.0, 951782400.0, *(rng.uniform(0, 4e9) for _ in range(2000))]:
        assert _http_date(moment) == email.utils.formatdate(moment, usegmt=True)


@pytest.mark.parametrize("spelling", ["Lax", "LAX", "lax", "Strict", "NONE"])
def test_same_site_takes_every_spelling_starlette_takes(spelling: str) -> None:
    client = TestClient(make_app(MemoryStore(), same_site=spelling), base_url="https://testserver")
    assert f"; samesite={spelling.lower()}" in client.get("/put?a=1").headers["set-cookie"]
    with pytest.raises(ValueError, match="same_site"):
        make_app(MemoryStore(), same_site="sideways")


def test_a_lone_surrogate_from_a_json_body_is_refused_at_assignment(store_kind: str, tmp_path: Path) -> None:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def save(request: Any) -> JSONResponse:
        data = await request.json()  # JSON's "\ud800" escape gives a str no UTF-8 can hold
        try:
            request.session.update(data)
        except TypeError as exc:
            return JSONResponse(str(exc), status_code=400)
        return JSONResponse("saved")

    store = make_store(store_kind, str(tmp_path / "s.db"))
    client = TestClient(SessionMiddleware(Starlette(routes=[Route("/save", save, methods=["POST"])]), store=store))
    assert client.post("/save", json={"ok": "fine"}).json() == "saved"
    for body in ('{"k": "\\ud800"}', '{"k": ["a", {"b": "\\udfff"}]}', '{"\\ud800": 1}'):
        response = client.post("/save", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400 and "surrogate" in response.json()
        assert "set-cookie" not in response.headers
    assert records(store) == 1


def test_a_session_over_the_size_limit_is_a_503_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from buntsession.codec import MAX_RECORD_SIZE

    async def big(request: Any) -> PlainTextResponse:
        with pytest.raises(ValueError, match="size limit"):  # one value too large: refused at assignment
            request.session.put_bytes("huge", bytes(70 * 1024 * 1024))
        for name in ("x", "y"):  # each fits, together they do not: refused at commit
            request.session.put_bytes(name, bytes(MAX_RECORD_SIZE // 8 * 3))
        return PlainTextResponse("ok")

    store = MemoryStore()
    client = TestClient(SessionMiddleware(Starlette(routes=[Route("/big", big)]), store=store))
    with caplog.at_level(logging.ERROR, logger="buntsession"):
        response = client.get("/big")
    assert response.status_code == 503 and "set-cookie" not in response.headers
    [line] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "over the limit" in line.getMessage() and line.exc_info is None
    assert len(store) == 0


def test_the_first_cookie_of_the_name_decides_and_only_in_its_exact_form() -> None:
    store = MemoryStore()
    app = make_app(store, secret_key="k")
    client = TestClient(app)
    client.get("/put?a=1")
    good = client.cookies["session"]
    token, signature = good.split(".")
    cases = {
        f"session={good}": {"a": "1"},
        f"other=1; session={good}  ; more=2": {"a": "1"},  # spaces around a value are not part of it
        f"xsession=junk; session={good}": {"a": "1"},  # another cookie whose name ends alike
        f"session={good}x": {},
        f"session={good[:-1]}": {},
        f"session={token}": {},  # unsigned, where a signature is required
        f'session="{good}"': {},
        f"session=junk; session={good}": {},  # the first one decides
        f"session={token}.{signature.lower()}": {} if signature != signature.lower() else {"a": "1"},
    }
    for header, expected in cases.items():
        assert TestClient(app, headers={"cookie": header}).get("/get").json() == expected, header
