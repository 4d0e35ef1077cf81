"""import_cookie_sessions: cookies made by Starlette's own SessionMiddleware become server-side sessions."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import itsdangerous
import pytest
import test_middleware
from session_app import make_app, make_store
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware as StarletteSessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient
from test_middleware import records

from buntsession import MemoryStore, SessionMiddleware

store_kind = test_middleware.store_kind  # the fixture: every test that takes it runs on each store

SECRET = "the-old-starlette-secret"
OUR_COOKIE = re.compile(r"session=([A-Za-z0-9_-]{43}\.[A-Za-z0-9_-]{43});")


async def starlette_put(request: Request) -> Response:
    for key, value in request.query_params.items():
        request.session[key] = value
    request.session["numbers"] = [1, 2.5, {"deep": True}]
    return JSONResponse(dict(request.session))


def starlette_cookie(secret: str = SECRET, max_age: int | None = 3600, age: int = 0, **data: str) -> str:
    """A session cookie made by Starlette's own SessionMiddleware, signed `age` seconds ago."""
    app = Starlette(routes=[Route("/put", starlette_put)],
                    middleware=[Middleware(StarletteSessionMiddleware, secret_key=secret, max_age=max_age)])
    original = itsdangerous.TimestampSigner.get_timestamp
    try:
        itsdangerous.TimestampSigner.get_timestamp = lambda self: int(time.time()) - age  # type: ignore[method-assign]
        response = TestClient(app).get("/put", params=data)
    finally:
        itsdangerous.TimestampSigner.get_timestamp = original  # type: ignore[method-assign]
    match = re.search(r"session=([^;]*);", response.headers["set-cookie"])
    assert match is not None
    return match[1]


def give(app: TestClient, cookie: str) -> None:
    """Send `cookie` as the session cookie from now on (it is replaced as a browser would replace it)."""
    app.cookies.set("session", cookie, domain="testserver.local", path="/")


def client(store: Any, **options: Any) -> TestClient:
    options.setdefault("secret_key", SECRET)
    options.setdefault("max_age", 3600)
    return TestClient(make_app(store, import_cookie_sessions=True, **options))


def test_a_starlette_cookie_becomes_a_server_side_session_once(store_kind: str, tmp_path: Path) -> None:
    store = make_store(store_kind, str(tmp_path / "s.db"))
    old = starlette_cookie(user="ada", cart="apple")
    app = client(store)
    give(app, old)
    response = app.get("/get")
    assert response.json() == {"user": "ada", "cart": "apple", "numbers": [1, 2.5, {"deep": True}]}
    new = OUR_COOKIE.search(response.headers["set-cookie"])
    assert new is not None  # a new token, in a new cookie of our own form
    assert app.cookies["session"] == new[1]
    assert app.get("/get").json()["user"] == "ada"
    assert "set-cookie" not in app.get("/get").headers  # it is an ordinary session now
    app.get("/put?cart=pear")

    # The old cookie again (a request that overlapped the first, or a replay) finds the same session.
    again = client(store)
    give(again, old)
    response = again.get("/get")
    assert response.json()["cart"] == "pear"
    assert OUR_COOKIE.search(response.headers["set-cookie"])[1] == new[1]  # type: ignore[index]


def test_after_a_logout_the_old_cookie_brings_nothing_back(store_kind: str, tmp_path: Path) -> None:
    store = make_store(store_kind, str(tmp_path / "s.db"))
    old = starlette_cookie(user="ada")
    app = client(store)
    give(app, old)
    assert app.get("/get").json()["user"] == "ada"
    app.post("/logout")
    replay = client(store)
    give(replay, old)
    response = replay.get("/get")
    assert response.json() == {}
    assert "set-cookie" not in response.headers


def test_a_renewed_imported_session_keeps_the_old_cookie_pointing_nowhere(tmp_path: Path) -> None:
    store = MemoryStore()
    old = starlette_cookie(user="ada")
    app = client(store)
    give(app, old)
    assert app.get("/get").json()["user"] == "ada"  # imported
    app.post("/login")  # then renew_token(): the token the old cookie led to is dead
    assert app.get("/get").json()["user"] == "alice"
    replay = client(store)
    give(replay, old)
    assert replay.get("/get").json() == {}


@pytest.mark.parametrize("case", ["forged", "tampered", "expired", "garbage", "not-json", "nan", "list"])
def test_a_bad_starlette_cookie_gives_a_fresh_empty_session(store_kind: str, tmp_path: Path, case: str) -> None:
    store = make_store(store_kind, str(tmp_path / "s.db"))
    signer = itsdangerous.TimestampSigner(SECRET)
    if case == "forged":
        cookie = starlette_cookie(secret="another secret", user="mallory")
    elif case == "tampered":
        cookie = starlette_cookie(user="ada")
        payload, rest = cookie.split(".", 1)
        cookie = payload[:-4] + ("AAAA" if payload[-4:] != "AAAA" else "BBBB") + "." + rest
    elif case == "expired":
        cookie = starlette_cookie(user="ada", age=3601)
    elif case == "garbage":
        cookie = "not-a-cookie"
    elif case == "not-json":
        cookie = signer.sign(b"bm90IGpzb24=").decode()  # base64 of "not json"
    elif case == "nan":
        cookie = signer.sign(b"eyJ4IjogTmFOfQ==").decode()  # {"x": NaN}
    else:
        cookie = signer.sign(b"WzEsIDJd").decode()  # [1, 2]
    app = client(store)
    give(app, cookie)
    response = app.get("/get")
    assert response.json() == {}
    assert "set-cookie" not in response.headers
    assert records(store) == 0


def test_a_cookie_signed_within_max_age_is_taken(tmp_path: Path) -> None:
    app = client(MemoryStore())
    give(app, starlette_cookie(user="ada", age=3500))
    assert app.get("/get").json()["user"] == "ada"


def test_without_the_option_a_starlette_cookie_is_an_unknown_cookie() -> None:
    app = TestClient(make_app(MemoryStore(), secret_key=SECRET))
    give(app, starlette_cookie(user="ada"))
    assert app.get("/get").json() == {}


def test_the_option_needs_a_secret_key() -> None:
    with pytest.raises(ValueError, match="secret_key"):
        SessionMiddleware(make_app(MemoryStore()), import_cookie_sessions=True)


def test_a_failed_response_imports_nothing_and_the_next_request_imports_it(tmp_path: Path) -> None:
    store = MemoryStore()
    old = starlette_cookie(user="ada")
    app = client(store)
    give(app, old)
    response = app.get("/put_then_500")
    assert response.status_code == 500 and "set-cookie" not in response.headers
    assert len(store) == 0
    assert app.get("/get").json()["user"] == "ada"


def test_a_key_rotation_list_imports_cookies_signed_with_any_of_its_keys() -> None:
    app = client(MemoryStore(), secret_key=["new key", SECRET])
    give(app, starlette_cookie(user="ada"))
    assert app.get("/get").json()["user"] == "ada"


def test_our_own_cookies_are_unaffected_by_the_option(store_kind: str, tmp_path: Path) -> None:
    app = client(make_store(store_kind, str(tmp_path / "s.db")))
    assert app.get("/incr").json() == 1
    assert app.get("/incr").json() == 2
