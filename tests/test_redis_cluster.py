"""RedisStore over `redis.asyncio.RedisCluster`, on a real three-node cluster the fixtures start. (The whole
session suite runs on it too: see test_middleware.py's store_kind fixture.)"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from conftest import _require_redis_server
from redis_cluster import RedisCluster
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from buntsession import SessionMiddleware
from buntsession.redis import RedisStore


async def incr(request: Request) -> PlainTextResponse:
    request.session.put_int("n", request.session.get_int("n") + 1)
    return PlainTextResponse(str(request.session.get_int("n")))


@pytest.fixture
def own_cluster() -> Iterator[RedisCluster]:
    """A cluster of this test's own, since the test stops one of its nodes."""
    _require_redis_server()
    with tempfile.TemporaryDirectory() as workdir:
        cluster = RedisCluster(workdir)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


def test_sessions_spread_over_every_node(redis_cluster: Any) -> None:
    store = RedisStore(redis.asyncio.RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0]), prefix="spread:")
    app = SessionMiddleware(Starlette(routes=[Route("/incr", incr)]), store=store)
    with TestClient(app) as http:
        for _ in range(30):
            http.cookies.clear()
            assert http.get("/incr").text == "1"  # a new session each time
    nodes = {port: redis.Redis(port=port).keys("spread:*") for port in redis_cluster.ports}
    assert sum(len(keys) for keys in nodes.values()) == 30
    assert all(nodes.values()), "every node holds some sessions"


def test_a_node_restart_in_the_middle_of_load_gives_only_200s_and_503s(own_cluster: RedisCluster) -> None:
    client = redis.asyncio.RedisCluster(host="127.0.0.1", port=own_cluster.ports[0], socket_connect_timeout=0.5,
                                        socket_timeout=0.5)
    store = RedisStore(client, prefix="restart:", timeout=1.0)
    app = SessionMiddleware(Starlette(routes=[Route("/incr", incr)]), store=store)
    statuses: list[int] = []
    cookies = []
    with TestClient(app) as http:
        for _ in range(12):  # sessions on every node
            http.cookies.clear()
            response = http.get("/incr")
            assert response.status_code == 200
            cookies.append(response.cookies["session"])
        for i in range(60):
            if i == 20:
                own_cluster.stop_node(1)
            if i == 40:
                own_cluster.start_node(1)
                own_cluster.wait_ready()
            http.cookies = {"session": cookies[i % len(cookies)]}
            statuses.append(http.get("/incr").status_code)
        assert set(statuses) <= {200, 503}, statuses
        assert 503 in statuses[20:40], "the stopped node's sessions are unavailable"
        after = []
        for cookie in cookies:
            http.cookies = {"session": cookie}
            after.append(http.get("/incr").status_code)
    assert set(statuses[:20]) == {200} and set(after) == {200}, (statuses, after)
    assert os.path.exists(os.path.join(own_cluster.workdir, str(own_cluster.ports[1]), "nodes.conf"))
