"""RedisStore on a real redis-server: exact values, expiry, client ownership, outages. (The whole session
suite also runs on it: see test_middleware.py's store_kind fixture.)"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any

import pytest
import redis
import redis.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from buntsession import SessionMiddleware
from buntsession.redis import RedisStore
from buntsession.session import store_key


async def write(request: Request) -> JSONResponse:
    s = request.session
    s.put_int("big", 2**70 + 1)
    s.put_float("tenth", 0.1 + 0.2)
    s.put_object("nested", {"ints": [2**64, -(2**63)], "f": 1e-300})
    return JSONResponse({})


async def read(request: Request) -> JSONResponse:
    s = request.session
    return JSONResponse({"big": str(s.get_int("big")), "tenth": repr(s.get_float("tenth")),
                         "nested": repr(s.get_object("nested"))})


def app_on(store: RedisStore, **options: Any) -> SessionMiddleware:
    return SessionMiddleware(Starlette(routes=[Route("/write", write), Route("/read", read)]), store=store,
                             **options)


@pytest.mark.parametrize("decode", [False, True])
def test_values_stay_exact_whether_or_not_the_client_decodes(redis_server: Any, decode: bool) -> None:
    client = redis.asyncio.Redis(port=redis_server.port, decode_responses=decode)
    closed: list[str] = []

    async def record(*args: Any, **kwargs: Any) -> None:
        closed.append("closed")

    client.aclose = record  # type: ignore[method-assign]
    client.connection_pool.disconnect = record  # type: ignore[method-assign]
    with TestClient(app_on(RedisStore(client, prefix=f"exact{decode}:"))) as http:
        http.get("/write")
        assert http.get("/read").json() == {"big": str(2**70 + 1), "tenth": repr(0.1 + 0.2),
                                            "nested": repr({"ints": [2**64, -(2**63)], "f": 1e-300})}
    assert closed == []  # the lifespan's shutdown left the caller's client alone


def test_a_session_is_a_hash_with_an_absolute_expiry(redis_server: Any) -> None:
    sync = redis.Redis(port=redis_server.port, decode_responses=True)
    store = RedisStore(redis.asyncio.Redis(port=redis_server.port), prefix="hash:")
    http = TestClient(app_on(store, max_age=3600))
    started = time.time()
    token = http.get("/write").headers["set-cookie"].split(";")[0].split("=", 1)[1]
    key = "hash:" + store_key(token)
    fields = sync.hgetall(key)
    assert set(fields) == {"m:c", "m:e", "m:r", "d:big", "d:tenth", "d:nested"}
    end = float(fields["m:e"])
    assert started <= float(fields["m:c"]) <= end - 3600 + 1
    assert sync.pexpiretime(key) == math.ceil(end * 1000)  # the absolute end, to the millisecond
    http.get("/write")  # a later write keeps the same end
    assert sync.pexpiretime(key) == math.ceil(end * 1000)


def test_an_unreachable_server_gives_503_within_the_timeout_and_recovers(redis_server: Any) -> None:
    store = RedisStore(redis.asyncio.Redis(port=redis_server.port, socket_connect_timeout=1), prefix="down:",
                       timeout=0.5)
    http = TestClient(app_on(store))
    http.get("/write")
    redis_server.stop()
    try:
        started = time.monotonic()
        assert http.get("/read").status_code == 503
        assert time.monotonic() - started < 3
    finally:
        redis_server.start()
    assert http.get("/read").status_code == 200  # back by itself (the data went with the server)
    http.get("/write")
    assert http.get("/read").json()["big"] == str(2**70 + 1)


def test_a_stalled_server_gives_503_within_the_timeout(redis_server: Any) -> None:
    store = RedisStore(redis.asyncio.Redis(port=redis_server.port), prefix="slow:", timeout=0.5)
    http = TestClient(app_on(store))
    http.get("/write")
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert http.get("/read").status_code == 503
        assert time.monotonic() - started < 3
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    assert http.get("/read").status_code == 200


def test_a_restart_in_the_middle_of_a_run_gives_no_500(redis_server: Any) -> None:
    store = RedisStore(redis.asyncio.Redis(port=redis_server.port, socket_connect_timeout=1), prefix="run:",
                       timeout=0.5)
    statuses: list[int] = []
    with TestClient(app_on(store)) as http:
        for i in range(60):
            if i == 20:
                redis_server.stop()
            if i == 40:
                redis_server.start()
            statuses.append(http.get("/write" if i % 2 else "/read").status_code)
    assert set(statuses[:20]) == {200}
    assert set(statuses[21:40]) == {503}
    assert set(statuses[41:]) == {200}
