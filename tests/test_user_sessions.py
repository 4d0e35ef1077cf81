"""Sessions of a user: login, listing, ending one, ending all, through the middleware and the stores."""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import test_middleware
from helpers import FakeClock
from session_app import ROUTES, make_store
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from buntsession import DB, BuntStore, MemoryStore, Session, SessionInfo, SessionMiddleware
from buntsession.codec import Meta, decode_meta, decode_record, encode_record
from buntsession.lifecycle import Lifecycle
from buntsession.session import store_key
from buntsession.users import session_id

store_kind = test_middleware.store_kind  # the fixture: every test that takes it runs on each store


async def login(request: Request) -> Response:
    request.session.login(request.query_params["user"])
    return JSONResponse(request.session.token)


async def whoami(request: Request) -> Response:
    return JSONResponse(request.session.user_id)


def _info(info: SessionInfo) -> dict[str, Any]:
    return {"id": info.id, "current": info.current, "user_agent": info.user_agent,
            "created_at": info.created_at.timestamp(), "last_active": info.last_active.timestamp(),
            "expires_at": info.expires_at.timestamp()}


async def sessions(request: Request) -> Response:
    return JSONResponse([_info(info) for info in await request.session.user_sessions()])


async def end_one(request: Request) -> Response:
    return JSONResponse(await request.session.end_user_session(request.query_params["id"]))


async def end_all(request: Request) -> Response:
    keep = request.query_params.get("keep", "1") == "1"
    return JSONResponse(await request.session.end_user_sessions(keep_current=keep))


async def renew(request: Request) -> Response:
    request.session.renew_token()
    return JSONResponse(request.session.token)


async def login_and_end_others(request: Request) -> Response:
    request.session.login(request.query_params["user"])
    return JSONResponse(await request.session.end_user_sessions())


USER_ROUTES = [Route("/login_as", login, methods=["POST"]), Route("/whoami", whoami), Route("/sessions", sessions),
               Route("/end_one", end_one, methods=["POST"]), Route("/end_all", end_all, methods=["POST"]),
               Route("/renew", renew, methods=["POST"]),
               Route("/login_and_end_others", login_and_end_others, methods=["POST"])]


def app_for(store: Any, **options: Any) -> SessionMiddleware:
    return SessionMiddleware(Starlette(routes=USER_ROUTES + ROUTES), store=store, **options)


def browser(app: SessionMiddleware, agent: str) -> TestClient:
    return TestClient(app, headers={"user-agent": agent})


def signed_in(app: SessionMiddleware, user: str, agent: str) -> TestClient:
    client = browser(app, agent)
    client.get("/put?cart=apple")
    client.post(f"/login_as?user={user}")
    assert client.get("/whoami").json() == user
    return client


def test_login_renews_the_token_binds_the_user_and_keeps_the_data(store_kind: str, tmp_path: Path) -> None:
    app = app_for(make_store(store_kind, str(tmp_path / "s.db")))
    client = browser(app, "Browser A")
    client.get("/put?cart=apple")
    before = client.cookies["session"]
    assert client.get("/whoami").json() is None
    assert client.get("/sessions").json() == []  # anonymous: nothing to list
    assert client.post("/end_all").json() == 0
    assert client.post("/end_one?id=" + "0" * 32).json() is False
    client.post("/login_as?user=alice")
    assert client.cookies["session"] != before
    assert client.get("/whoami").json() == "alice"
    assert client.get("/get").json() == {"cart": "apple"}
    client.post("/renew")  # the binding survives renew_token()
    assert client.get("/whoami").json() == "alice"
    (info,) = client.get("/sessions").json()
    assert info["current"] is True and info["user_agent"] == "Browser A"

    thief = browser(app, "Thief")
    thief.cookies = {"session": before}  # the token from before the login finds nothing
    assert thief.get("/whoami").json() is None


def test_a_user_lists_only_their_own_live_sessions_newest_first(store_kind: str, tmp_path: Path) -> None:
    store = make_store(store_kind, str(tmp_path / "s.db"))
    app = app_for(store)
    a = signed_in(app, "alice", "Browser A")
    b = signed_in(app, "alice", "Browser B")
    bob = signed_in(app, "bob", "Bob's browser")
    listed = a.get("/sessions").json()
    assert [s["user_agent"] for s in listed] == ["Browser B", "Browser A"]  # the later login first
    assert [s["current"] for s in listed] == [False, True]
    assert [s["current"] for s in b.get("/sessions").json()] == [True, False]
    assert [s["user_agent"] for s in bob.get("/sessions").json()] == ["Bob's browser"]
    for s in listed:
        assert re.fullmatch(r"[0-9a-f]{32}", s["id"])
        assert s["created_at"] <= s["last_active"] <= time.time() < s["expires_at"]
    # The public id is neither the token, nor the store key, nor a part of either.
    for client in (a, b):
        token = client.cookies["session"]
        for s in listed:
            assert s["id"] not in token and s["id"] not in store_key(token)
    assert {session_id(store_key(c.cookies["session"])) for c in (a, b)} == {s["id"] for s in listed}

    infos = anyio.run(store.user_sessions, "alice")  # the store answers outside any request
    assert all(isinstance(i, SessionInfo) and not i.current for i in infos)
    assert [i.user_agent for i in infos] == ["Browser B", "Browser A"]
    assert anyio.run(store.user_sessions, "nobody") == []


def test_ending_one_session_logs_that_browser_out_and_only_that_one(store_kind: str, tmp_path: Path) -> None:
    app = app_for(make_store(store_kind, str(tmp_path / "s.db")))
    a = signed_in(app, "alice", "Browser A")
    b = signed_in(app, "alice", "Browser B")
    bob = signed_in(app, "bob", "Bob's browser")
    (bobs,) = bob.get("/sessions").json()
    assert a.post(f"/end_one?id={bobs['id']}").json() is False  # another user's session: untouched
    assert bob.get("/whoami").json() == "bob"
    assert a.post(f"/end_one?id={'f' * 32}").json() is False
    other = next(s for s in a.get("/sessions").json() if not s["current"])
    assert a.post(f"/end_one?id={other['id']}").json() is True
    assert b.get("/whoami").json() is None and b.get("/get").json() == {}
    assert a.post(f"/end_one?id={other['id']}").json() is False  # ended already
    assert [s["user_agent"] for s in a.get("/sessions").json()] == ["Browser A"]
    assert a.get("/whoami").json() == "alice"


def test_ending_ones_own_session_by_id_destroys_it(store_kind: str, tmp_path: Path) -> None:
    app = app_for(make_store(store_kind, str(tmp_path / "s.db")))
    a = signed_in(app, "alice", "Browser A")
    (mine,) = a.get("/sessions").json()
    response = a.post(f"/end_one?id={mine['id']}")
    assert response.json() is True
    assert "Max-Age=0" in response.headers["set-cookie"]
    assert a.get("/whoami").json() is None


def test_log_out_everywhere_else_and_everywhere(store_kind: str, tmp_path: Path) -> None:
    store = make_store(store_kind, str(tmp_path / "s.db"))
    app = app_for(store)
    a = signed_in(app, "alice", "Browser A")
    others = [signed_in(app, "alice", f"Browser {n}") for n in "BCD"]
    bob = signed_in(app, "bob", "Bob's browser")
    assert a.post("/end_all?keep=1").json() == 3
    assert all(c.get("/whoami").json() is None for c in others)
    assert a.get("/whoami").json() == "alice"
    assert [s["current"] for s in a.get("/sessions").json()] == [True]
    assert a.post("/end_all?keep=1").json() == 0
    b = signed_in(app, "alice", "Browser B")
    response = a.post("/end_all?keep=0")
    assert response.json() == 2
    assert "Max-Age=0" in response.headers["set-cookie"]
    assert a.get("/whoami").json() is None and b.get("/whoami").json() is None
    assert anyio.run(store.user_sessions, "alice") == []
    assert bob.get("/whoami").json() == "bob"
    assert anyio.run(store.end_user_sessions, "bob") == 1  # outside a request: an admin, a password reset
    assert bob.get("/whoami").json() is None
    assert anyio.run(store.end_user_sessions, "bob") == 0


def test_logging_in_can_end_the_users_other_sessions_at_once(store_kind: str, tmp_path: Path) -> None:
    app = app_for(make_store(store_kind, str(tmp_path / "s.db")))
    a = signed_in(app, "alice", "Browser A")
    b = browser(app, "Browser B")
    assert b.post("/login_and_end_others?user=alice").json() == 1
    assert a.get("/whoami").json() is None
    assert b.get("/whoami").json() == "alice"


def test_destroy_unbinds_and_logging_in_as_another_user_moves_the_session(store_kind: str, tmp_path: Path) -> None:
    store = make_store(store_kind, str(tmp_path / "s.db"))
    app = app_for(store)
    a = signed_in(app, "alice", "Browser A")
    a.post("/login_as?user=carol")
    assert anyio.run(store.user_sessions, "alice") == []
    assert len(anyio.run(store.user_sessions, "carol")) == 1
    a.post("/logout")
    assert anyio.run(store.user_sessions, "carol") == []
    assert a.get("/whoami").json() is None


def test_expired_sessions_are_never_listed(store_kind: str, tmp_path: Path) -> None:
    store = make_store(store_kind, str(tmp_path / "s.db"))
    short = app_for(store, max_age=1)
    signed_in(short, "alice", "Short-lived")
    keeper = signed_in(app_for(store), "alice", "Long-lived")
    assert len(keeper.get("/sessions").json()) == 2
    time.sleep(1.5)
    assert [s["user_agent"] for s in keeper.get("/sessions").json()] == ["Long-lived"]
    assert anyio.run(store.end_user_sessions, "alice") == 1


def test_an_ended_session_stays_ended_after_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    db = DB(path)
    app = app_for(BuntStore(db))
    a = signed_in(app, "alice", "Browser A")
    b = signed_in(app, "alice", "Browser B")
    assert a.post("/end_all").json() == 1
    cookies = {"a": a.cookies["session"], "b": b.cookies["session"]}
    anyio.run(db.close)  # the process ends (served without lifespan, the store opened on first use)
    restarted = app_for(BuntStore(DB(path)))  # a new process would open the file afresh
    again_a, again_b = browser(restarted, "Browser A"), browser(restarted, "Browser B")
    again_a.cookies = {"session": cookies["a"]}
    again_b.cookies = {"session": cookies["b"]}
    assert again_b.get("/whoami").json() is None
    assert again_a.get("/whoami").json() == "alice"
    assert [s["user_agent"] for s in again_a.get("/sessions").json()] == ["Browser A"]


def test_listing_and_ending_read_only_the_users_own_entries(tmp_path: Path) -> None:
    async def run() -> None:
        async with DB(str(tmp_path / "s.db")) as db:
            store = BuntStore(db)
            life = Lifecycle(store, 3600)
            for n in range(500):  # other users' sessions and anonymous ones
                session = await life.load(None)
                session.put_int("n", n)
                if n % 2:
                    session.login(f"user-{n}")
                await life.commit(session, ok=True)
            mine = []
            for _ in range(3):
                session = await life.load(None)
                session.login("alice")
                await life.commit(session, ok=True)
                mine.append(session.token)
            reads: list[str] = []
            get_with_expiry = db.get_with_expiry

            async def counted(key: str) -> Any:
                reads.append(key)
                return await get_with_expiry(key)

            async def no_scan(prefix: str = "") -> Any:
                raise AssertionError("a user's sessions must not be found by scanning every key")
                yield

            db.get_with_expiry = counted  # type: ignore[method-assign]
            db.scan = no_scan  # type: ignore[assignment,method-assign]
            assert len(await store.user_sessions("alice")) == 3
            assert sorted(reads) == sorted(f"session:{store_key(t)}" for t in mine)
            reads.clear()
            assert await store.end_user_sessions("alice") == 3
            assert len(reads) == 3

    anyio.run(run)


@pytest.mark.anyio
async def test_last_active_is_written_at_most_once_per_interval(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)
    life = Lifecycle(store, 24 * 3600)
    life.clock = clock
    writes = []
    merge = store.merge

    async def counted(key: str, update: Any) -> bool:
        writes.append(key)
        return await merge(key, update)

    store.merge = counted  # type: ignore[method-assign]
    session = await life.load(None)
    session.login("alice")
    await life.commit(session, ok=True, request_headers=[(b"user-agent", b"Browser A")])
    token = session.token
    assert token is not None
    started = clock.now
    writes.clear()
    for _ in range(5):  # reads within the interval write nothing
        clock.advance(50)
        assert (await life.load(token)).user_id == "alice"
    assert writes == []
    (info,) = await store.user_sessions("alice")
    assert info.last_active.timestamp() == started and info.user_agent == "Browser A"
    clock.advance(60)  # 310 s since the login
    loaded = await life.load(token)
    assert len(writes) == 1
    (info,) = await store.user_sessions("alice")
    assert info.last_active.timestamp() == clock.now
    loaded.put_int("n", 1)  # a write after the activity write merges onto it as usual
    await life.commit(loaded, ok=True)
    clock.advance(10)
    again = await life.load(token)
    assert dict(again) == {"n": 1} and again.user_id == "alice"
    assert len(writes) == 2
    anonymous = await life.load(None)
    anonymous.put_int("n", 1)
    await life.commit(anonymous, ok=True)
    assert anonymous.token is not None
    writes.clear()
    clock.advance(10_000)
    await life.load(anonymous.token)
    assert writes == []  # an anonymous session never writes for its activity


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_login_refuses_what_is_not_a_non_empty_str() -> None:
    for bad in (5, "", b"alice", None, "\ud800"):
        session = Session()
        with pytest.raises(TypeError):
            session.login(bad)  # type: ignore[arg-type]
        assert session.user_id is None and session.token is None
    session = Session()
    session.login("ada")
    assert session.user_id == "ada" and session.token is not None


def test_records_without_user_fields_still_load_and_user_fields_round_trip() -> None:
    old = b'{"v":2,"c":1.5,"e":100.0,"r":null,"d":{"a":1}}'  # as every record before users were written
    meta, values = decode_record(old)
    assert meta == Meta(1.5, 100.0) and values == {"a": 1} and meta.user is None
    assert decode_meta(old) == meta
    bound = Meta(1.5, 100.0, True, "ada \"quoted\" ,\"d\":", "Mozilla/5.0 ,\"d\":{", 7.0)
    record = encode_record(bound, {"a": 1})
    assert decode_record(record) == (bound, {"a": 1})
    assert decode_meta(record) == bound
    assert decode_meta(b'{"v":1,"c":1,"e":2,"r":null,"d":{"x":"s1"}}') == Meta(1.0, 2.0)
    for bad in (b'{"v":2,"c":1.5,"e":100.0,"r":null,"u":5,"d":{}}', b'{"v":2,"c":1.5,"e":100.0,"r":null,"u":"x",'
                b'"a":1,"l":null,"d":{}}'):
        with pytest.raises(ValueError):
            decode_record(bad)
        with pytest.raises(ValueError):
            decode_meta(bad)


def test_store_calls_refuse_a_user_id_that_is_not_a_non_empty_str() -> None:
    store = MemoryStore()
    for bad in (5, "", None):
        with pytest.raises(TypeError):
            anyio.run(store.user_sessions, bad)
        with pytest.raises(TypeError):
            anyio.run(store.end_user_sessions, bad)


def test_a_store_without_a_user_index_says_so() -> None:
    class Plain:
        def __init__(self) -> None:
            self.data: dict[str, bytes] = {}

        async def find(self, key: str) -> bytes | None:
            return self.data.get(key)

        async def commit(self, key: str, data: bytes, expires_at: float) -> None:
            self.data[key] = data

        async def delete(self, key: str) -> None:
            self.data.pop(key, None)

    client = TestClient(app_for(Plain()))
    client.post("/login_as?user=alice")
    assert client.get("/whoami").json() == "alice"  # the binding is in the record, whatever the store
    with pytest.raises(NotImplementedError):
        client.get("/sessions")


def test_the_index_holds_no_token(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    app = app_for(BuntStore(DB(str(path))))
    tokens = [signed_in(app, "alice@example.com", f"Browser {n}").cookies["session"] for n in range(3)]
    data = path.read_bytes()
    assert not any(token.encode() in data for token in tokens)
    assert b"alice@example.com" in data  # the user id, in the records' metadata only


@pytest.mark.anyio
async def test_two_workers_sharing_a_file_log_in_and_end_concurrently(tmp_path: Path, anyio_backend: str) -> None:
    path = str(tmp_path / "s.db")
    async with DB(path, shared=True) as one, DB(path, shared=True) as two:
        stores = [BuntStore(one), BuntStore(two)]
        lives = [Lifecycle(store, 3600) for store in stores]

        async def log_in(n: int) -> None:
            session = await lives[n % 2].load(None)
            session.login("alice")
            await lives[n % 2].commit(session, ok=True)

        async def end(n: int) -> None:
            await anyio.sleep(0)
            await stores[n % 2].end_user_sessions("alice")

        async with anyio.create_task_group() as tg:
            for n in range(40):
                tg.start_soon(log_in, n)
                if n % 13 == 0:
                    tg.start_soon(end, n)
        for n in range(3):
            await log_in(n)
        truth = set()
        async for key in one.scan("session:"):
            value = await one.get(key)
            if len(key) == 72 and value is not None and decode_meta(value).user == "alice":
                truth.add(session_id(key[len("session:"):]))
        assert len(truth) >= 3
        for store in stores:
            assert {info.id for info in await store.user_sessions("alice")} == truth
        assert await stores[1].end_user_sessions("alice") == len(truth)
        assert await stores[0].user_sessions("alice") == []


def test_an_index_never_listed_does_not_grow_with_ended_sessions(tmp_path: Path) -> None:
    async def run() -> None:
        async with DB(str(tmp_path / "s.db")) as db:
            store = BuntStore(db)
            short, long = Lifecycle(store, 1), Lifecycle(store, 3600)
            for _ in range(5):
                session = await short.load(None)
                session.login("alice")
                await short.commit(session, ok=True)
            assert len(await store._index_entries("alice")) == 5
            await anyio.sleep(1.2)
            session = await long.load(None)
            session.login("alice")
            await long.commit(session, ok=True)
            assert len(await store._index_entries("alice")) == 1  # the login dropped the ended ones

    anyio.run(run)


@pytest.mark.anyio
async def test_the_activity_write_also_moves_the_idle_deadline(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)
    life = Lifecycle(store, 24 * 3600, idle_timeout=600)
    life.clock = clock
    session = await life.load(None)
    session.login("alice")
    await life.commit(session, ok=True)
    assert session.token is not None and session.expires_at is not None
    assert session.expires_at.timestamp() == clock.now + 600
    clock.advance(310)
    loaded = await life.load(session.token)
    assert loaded.expires_at is not None and loaded.expires_at.timestamp() == clock.now + 600
    found = await store.find_with_expiry(store_key(session.token))
    assert found is not None and found[1] == clock.now + 600
    (info,) = await store.user_sessions("alice")
    assert info.last_active.timestamp() == clock.now and info.expires_at.timestamp() == clock.now + 600
    clock.advance(601)  # idle past the deadline: gone, and never listed
    assert (await life.load(session.token)).user_id is None
    assert await store.user_sessions("alice") == []


def test_redis_keys_a_user_index_of_its_own_with_one_key_per_call(redis_server: Any) -> None:
    import redis
    import redis.asyncio

    from buntsession.redis import RedisStore
    from buntsession.users import index_key

    prefix = f"layout:{secrets.token_hex(4)}:"
    store = RedisStore(redis.asyncio.Redis(port=redis_server.port), prefix=prefix)
    app = app_for(store)
    a = signed_in(app, "alice", "Browser A")
    b = signed_in(app, "alice", "Browser B")
    keys = {k.decode() for k in redis.Redis(port=redis_server.port).keys(prefix + "*")}
    sessions = {prefix + store_key(c.cookies["session"]) for c in (a, b)}
    index = prefix + index_key("alice")
    assert keys == sessions | {index}
    plain = redis.Redis(port=redis_server.port, decode_responses=True)
    assert set(plain.hkeys(index)) == {key[len(prefix):] for key in sessions}
    assert plain.hget(next(iter(sessions)), "m:u") == "alice"
    assert plain.pexpiretime(index) >= max(plain.pexpiretime(key) for key in sessions)
    assert a.post("/end_all?keep=0").json() == 2
    assert not redis.Redis(port=redis_server.port).keys(prefix + "*")  # the index went with its last entry
