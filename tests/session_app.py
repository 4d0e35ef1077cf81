"""A small Starlette app around SessionMiddleware, for the session tests."""

from __future__ import annotations

from typing import Any

import anyio
from helpers import FakeClock
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from buntsession import DB, BuntStore, MemoryStore, SessionMiddleware, Store

late_errors: list[BaseException] = []


async def put(request: Request) -> Response:
    for key, value in request.query_params.items():
        request.state.session.put_string(key, value)
    return JSONResponse(dict(request.session))


async def get(request: Request) -> Response:
    return JSONResponse(dict(request.session))


async def peek(request: Request) -> Response:
    return JSONResponse(request.session.get_string(request.query_params["key"]))


async def none(request: Request) -> Response:
    return PlainTextResponse("no session access")


async def incr(request: Request) -> Response:
    session = request.session
    session.put_int("n", session.get_int("n") + 1)
    return JSONResponse(session.get_int("n"))


async def slow_put(request: Request) -> Response:
    await anyio.sleep(float(request.query_params.get("delay", "0.2")))
    request.session.put_string(request.query_params["key"], "slow")
    return JSONResponse({})


async def login(request: Request) -> Response:
    request.session.renew_token()
    request.session.put_string("user", "alice")
    return JSONResponse(request.session.token)


async def logout(request: Request) -> Response:
    request.session.destroy()
    return JSONResponse({})


async def remember(request: Request) -> Response:
    request.session.remember_me(request.query_params.get("on") == "1")
    return JSONResponse({})


async def destroy_then_fail(request: Request) -> Response:
    request.session.destroy()
    raise RuntimeError("the app failed after logging out")


async def destroy_then_500(request: Request) -> Response:
    request.session.destroy()
    return PlainTextResponse("oops", status_code=500)


async def put_then_500(request: Request) -> Response:
    request.session.put_string("lost", "yes")
    return PlainTextResponse("oops", status_code=500)


async def change_after_start(request: Request) -> Response:
    def late() -> None:
        try:
            request.session.put_string("late", "yes")
        except RuntimeError as exc:
            late_errors.append(exc)

    request.session.put_string("early", "yes")
    return PlainTextResponse("ok", background=BackgroundTask(late))


async def meta(request: Request) -> Response:
    session = request.session
    return JSONResponse({
        "token": session.token,
        "created_at": session.created_at and session.created_at.timestamp(),
        "expires_at": session.expires_at and session.expires_at.timestamp(),
        "status": session.status.value,
    })


async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    session = websocket.session
    reply: dict[str, Any] = {"session": dict(session)}
    try:
        session["x"] = "from websocket"
    except RuntimeError as exc:
        reply["error"] = str(exc)
    await websocket.send_json(reply)
    await websocket.close()


ROUTES = [
    Route("/put", put), Route("/get", get), Route("/peek", peek), Route("/none", none), Route("/incr", incr),
    Route("/slow_put", slow_put), Route("/login", login, methods=["POST"]), Route("/logout", logout, methods=["POST"]),
    Route("/remember", remember), Route("/destroy_then_fail", destroy_then_fail),
    Route("/destroy_then_500", destroy_then_500), Route("/put_then_500", put_then_500),
    Route("/change_after_start", change_after_start), Route("/meta", meta), WebSocketRoute("/ws", ws),
]


REDIS_PORT: list[int] = []  # set by the store_kind fixture when a test runs on Redis
POSTGRES_DSN: list[str] = []  # set by the store_kind fixture when a test runs on PostgreSQL


def make_store(kind: str, path: str, clock: FakeClock | None = None, **db_options: Any) -> Store:
    """A fresh store of `kind`. A Redis store keeps the server's clock; the middleware's injected clock
    still decides what has ended, since it checks every session's end and store expiry itself."""
    if kind == "redis-cluster":
        import uuid

        import redis.asyncio

        from buntsession.redis import RedisStore

        client = redis.asyncio.RedisCluster(host="127.0.0.1", port=REDIS_PORT[0])
        return RedisStore(client, prefix=f"test:{uuid.uuid4().hex}:")
    if kind == "redis":
        import uuid

        import redis.asyncio

        from buntsession.redis import RedisStore

        return RedisStore(redis.asyncio.Redis(port=REDIS_PORT[0]), prefix=f"test:{uuid.uuid4().hex}:")
    if kind == "postgres":
        import uuid

        import asyncpg

        from buntsession.postgres import PostgresStore

        dsn = POSTGRES_DSN[0]  # a pool per event loop: TestClient outside `with` runs each request on a new one
        return PostgresStore(lambda: asyncpg.create_pool(dsn, min_size=1, max_size=4),
                             table=f"test_{uuid.uuid4().hex}")
    if kind == "memory":
        return MemoryStore(clock=clock) if clock else MemoryStore()
    db = DB(path, **db_options)
    if clock:
        db._clock = clock
    return BuntStore(db)


def make_app(store: Store, clock: FakeClock | None = None, **options: Any) -> SessionMiddleware:
    middleware = SessionMiddleware(Starlette(routes=ROUTES), store=store, **options)
    if clock:
        middleware.lifecycle.clock = clock
    return middleware
