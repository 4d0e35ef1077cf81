"""Stores side by side: buntsession's BuntStore and RedisStore, and starsessions' RedisStore, one run.

    .venv/bin/pip install -e '.[bench]'     # and Debian's redis-server
    .venv/bin/python benchmarks/redis_stores.py [--requests 2000] [--rounds 5]

Requests/s through httpx's ASGITransport (in-process, so the figures are the middleware and the store,
not a server) on a small Starlette app whose route reads and increments a counter in the session. The
Redis server is started here on a loopback port, with no persistence. Rounds interleave the contenders.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import anyio
import httpx
import redis.asyncio
from common import redis_server
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def incr(request: Request) -> PlainTextResponse:
    session = request.session
    session["n"] = session.get("n", 0) + 1
    return PlainTextResponse(str(session["n"]))


def build(kind: str, port: int, workdir: str) -> Any:
    if kind.startswith("starsessions"):
        from starsessions import SessionAutoloadMiddleware
        from starsessions import SessionMiddleware as StarSessions
        from starsessions.stores.redis import RedisStore as StarRedis

        store = StarRedis(connection=redis.asyncio.Redis(port=port), prefix=f"star{time.monotonic_ns()}.")
        return Starlette(routes=[Route("/incr", incr)], middleware=[
            Middleware(StarSessions, store=store, cookie_https_only=False, lifetime=3600),
            Middleware(SessionAutoloadMiddleware)])
    from buntsession import DB, BuntStore, SessionMiddleware
    from buntsession.redis import RedisStore

    if kind == "buntsession BuntStore":
        store = BuntStore(DB(os.path.join(workdir, f"{time.monotonic_ns()}.db")))
    else:
        store = RedisStore(redis.asyncio.Redis(port=port), prefix=f"bunt{time.monotonic_ns()}:")
    return Starlette(routes=[Route("/incr", incr)],
                     middleware=[Middleware(SessionMiddleware, store=store, secret_key="bench")])


CONTENDERS = ["buntsession BuntStore", "buntsession RedisStore", "starsessions RedisStore"]


async def run(requests: int, rounds: int, port: int, workdir: str) -> None:
    results: dict[str, list[float]] = {k: [] for k in CONTENDERS}
    for _ in range(rounds):
        for kind in CONTENDERS:
            app = build(kind, port, workdir)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
                assert (await client.get("/incr")).status_code == 200
                started = time.perf_counter()
                for _ in range(requests):
                    await client.get("/incr")
                results[kind].append(requests / (time.perf_counter() - started))
                assert (await client.get("/incr")).text == str(requests + 2), kind
    print(f"stores: {requests:,} read+write requests per round through ASGITransport, {rounds} rounds; "
          "median req/s [min-max]")
    base = statistics.median(results[CONTENDERS[0]])
    for kind in CONTENDERS:
        med = statistics.median(results[kind])
        print(f"  {kind:<26}{med:9.0f}  [{min(results[kind]):.0f}-{max(results[kind]):.0f}]  "
              f"{med / base:.2f}x the embedded store")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(dir=".", prefix=".bench-")
    try:
        with redis_server(workdir) as port:
            anyio.run(run, args.requests, args.rounds, port, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
