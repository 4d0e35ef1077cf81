"""Races and careless uses of the session, each found by trying to break it: renewals racing logouts and
writes, lists changed in place into what no record can keep, the decoded-record cache, cookies on shared
caches."""

from __future__ import annotations

import logging
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from buntsession import DB, BuntStore, MemoryStore, Session, SessionMiddleware
from buntsession.session import store_key

gate: dict[str, anyio.Event] = {}


async def start(request: Request) -> PlainTextResponse:
    request.session["user"] = "alice"
    request.session["cart"] = ["book"]
    return PlainTextResponse("ok")


async def slow_renew(request: Request) -> PlainTextResponse:
    _ = request.session["user"]
    await gate["go"].wait()
    request.session.renew_token()
    request.session["sudo"] = True
    return PlainTextResponse("renewed")


async def logout(request: Request) -> PlainTextResponse:
    request.session.destroy()
    return PlainTextResponse("bye")


async def add(request: Request) -> PlainTextResponse:
    request.session["note"] = "kept"
    return PlainTextResponse("added")


async def show(request: Request) -> PlainTextResponse:
    return PlainTextResponse(repr(dict(request.session)))


ROUTES = [Route("/start", start), Route("/renew", slow_renew), Route("/logout", logout), Route("/add", add),
          Route("/show", show)]


def cookie_of(response: httpx.Response) -> str:
    return response.headers["set-cookie"].split(";")[0].split("=", 1)[1]


async def race(store: Any, other: str) -> tuple[str, httpx.Response]:
    """A request renews the session while `other` runs to completion on the old token."""
    gate["go"] = anyio.Event()
    app = SessionMiddleware(Starlette(routes=ROUTES), store=store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        token = cookie_of(await client.get("/start"))
        renewed: dict[str, httpx.Response] = {}

        async def renew() -> None:
            renewed["r"] = await client.get("/renew", headers={"cookie": f"session={token}"})

        async with anyio.create_task_group() as tg:
            tg.start_soon(renew)
            await anyio.sleep(0.05)
            await client.get(f"/{other}", headers={"cookie": f"session={token}"})
            gate["go"].set()
        return token, renewed["r"]


@pytest.mark.anyio
async def test_a_logout_racing_a_renewal_stays_a_logout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for store in (MemoryStore(), BuntStore(DB(str(tmp_path / "s.db")))):
        token, renewed = await race(store, "logout")
        assert "set-cookie" not in renewed.headers  # no new token for an ended session
        assert await store.find(store_key(token)) is None
        assert any("not renewed" in r.getMessage() for r in caplog.records)


@pytest.mark.anyio
async def test_a_renewal_keeps_what_another_request_stored_meanwhile() -> None:
    store = MemoryStore()
    token, renewed = await race(store, "add")
    app = SessionMiddleware(Starlette(routes=ROUTES), store=store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        new = cookie_of(renewed)
        assert new != token
        shown = (await client.get("/show", headers={"cookie": f"session={new}"})).text
        assert shown == repr({"user": "alice", "cart": ["book"], "note": "kept", "sudo": True})
        assert (await client.get("/show", headers={"cookie": f"session={token}"})).text == "{}"


@pytest.mark.anyio
async def test_a_list_changed_while_the_store_writes_never_reaches_the_cache(tmp_path: Path) -> None:
    async def append_later(request: Request) -> PlainTextResponse:
        log = request.session["log"]
        log.append("stored")

        async def later() -> None:
            await anyio.sleep(0)
            log.append("never stored")

        request.scope["tg"].start_soon(later)
        return PlainTextResponse("ok")

    async def put(request: Request) -> PlainTextResponse:
        request.session["log"] = []
        return PlainTextResponse("ok")

    routes = [Route("/put", put), Route("/append", append_later), Route("/show", show)]
    db = DB(str(tmp_path / "s.db"), sync="always")  # the commit awaits an fsync: other tasks run meanwhile
    first, second = (SessionMiddleware(Starlette(routes=routes), store=BuntStore(db)) for _ in range(2))
    async with anyio.create_task_group() as tg:
        async def with_tg(scope: Any, receive: Any, send: Any) -> None:
            scope["tg"] = tg
            await first(scope, receive, send)

        transport = httpx.ASGITransport(app=with_tg)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await client.get("/put")
            await client.get("/append")
            await anyio.sleep(0.1)
            seen_here = (await client.get("/show")).text
            other = httpx.AsyncClient(transport=httpx.ASGITransport(app=second), base_url="http://t",
                                      cookies=client.cookies)
            seen_there = (await other.get("/show")).text
    assert seen_here == seen_there == repr({"log": ["stored"]})


@pytest.mark.parametrize("change", [
    lambda s: s["l"].append((1, 2)),  # a tuple would come back a list
    lambda s: s["d"].__setitem__(7, "x"),  # an int key would come back a str
    lambda s: s["d"].__setitem__("seen", datetime(2024, 1, 1)),  # a datetime inside a dict
    lambda s: s["l"].append(s["l"]),  # itself
    lambda s: s["l"].append({1, 2}),
    lambda s: s["l"].append(math.nan),
])
def test_a_value_changed_in_place_into_one_no_record_keeps_is_a_503_and_nothing_changes(
    change: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def put(request: Request) -> PlainTextResponse:
        request.session["l"], request.session["d"] = [], {}
        return PlainTextResponse("ok")

    async def mutate(request: Request) -> PlainTextResponse:
        change(request.session)
        return PlainTextResponse("ok")

    async def assign_then_mutate(request: Request) -> PlainTextResponse:
        request.session["l"], request.session["d"] = [], {}  # assigned, then changed before the commit
        change(request.session)
        return PlainTextResponse("ok")

    routes = [Route("/put", put), Route("/mutate", mutate), Route("/fresh", assign_then_mutate),
              Route("/show", show)]
    client = TestClient(SessionMiddleware(Starlette(routes=routes), store=MemoryStore()))
    client.get("/put")
    with caplog.at_level(logging.ERROR, logger="buntsession"):
        assert client.get("/mutate").status_code == 503
        assert client.get("/fresh").status_code == 503
    assert client.get("/show").text == repr({"l": [], "d": {}})
    assert all(r.exc_info is None for r in caplog.records)


def test_a_re_signed_cookie_is_never_shared_by_a_cache() -> None:
    async def put(request: Request) -> PlainTextResponse:
        request.session["x"] = 1
        return PlainTextResponse("ok")

    async def public(request: Request) -> PlainTextResponse:
        return PlainTextResponse("static", headers={"cache-control": "public, max-age=3600",
                                                    "vary": "X-Cookie-Consent"})

    store = MemoryStore()
    routes = [Route("/put", put), Route("/public", public)]
    old = TestClient(SessionMiddleware(Starlette(routes=routes), store=store, secret_key="old"))
    old.get("/put")
    rotated = SessionMiddleware(Starlette(routes=routes), store=store, secret_key=["new", "old"])
    response = TestClient(rotated, cookies=old.cookies).get("/public")
    assert "set-cookie" in response.headers
    assert response.headers["vary"] == "X-Cookie-Consent, Cookie"


def test_a_bytes_secret_is_one_key_and_a_stray_iterable_is_refused() -> None:
    from buntsession.signing import CookieSigner

    signer = CookieSigner(b"\x00" * 32)
    token = "A" * 43
    assert signer.verify(token.encode(), signer.sign(token).split(".")[1].encode()) == 0
    assert CookieSigner(str(7)).verify(token.encode(), CookieSigner("7").sign(token).split(".")[1].encode()) == 0
    assert signer.verify(token.encode(), CookieSigner("7").sign(token).split(".")[1].encode()) is None
    with pytest.raises(TypeError, match="secret_key"):
        CookieSigner(bytearray(b"key"))  # type: ignore[arg-type]


def test_put_float_of_an_int_too_large_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="too large"):
        Session().put_float("f", 10**400)


@pytest.mark.anyio
async def test_a_datetime_comes_back_the_same_from_the_cache_and_from_the_store(tmp_path: Path) -> None:
    from zoneinfo import ZoneInfo

    from buntsession.lifecycle import Lifecycle

    when = datetime(2026, 3, 29, 2, 30, tzinfo=ZoneInfo("Europe/Paris"))
    naive = datetime(2026, 10, 25, 2, 30, fold=1)
    async with DB(str(tmp_path / "s.db")) as db:
        writer, reader = Lifecycle(BuntStore(db), 3600), Lifecycle(BuntStore(db), 3600)
        session = await writer.load(None)
        session.put_time("when", when)
        session.put_time("naive", naive)
        change = await writer.commit(session, ok=True)
        assert change is not None
        cached, stored = await writer.load(change.token), await reader.load(change.token)
        for key in ("when", "naive"):
            a, b = cached.get_time(key), stored.get_time(key)
            assert (a, type(a.tzinfo), a.fold) == (b, type(b.tzinfo), b.fold)  # type: ignore[union-attr]
        assert cached.get_time("when").utcoffset() == timedelta(hours=1)  # type: ignore[union-attr]
        assert isinstance(stored.get_time("when").tzinfo, timezone)  # type: ignore[union-attr]
