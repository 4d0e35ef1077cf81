"""Stores side by side, reads and writes: BuntStore, RedisStore (one server and a cluster), PostgresStore and
starsessions' RedisStore.

    .venv/bin/pip install -e '.[bench]'     # and Debian's redis-server and postgresql
    .venv/bin/python benchmarks/stores.py [--requests 1000] [--rounds 3]

Requests/s through httpx's ASGITransport (in-process, so the figures are the middleware and the store,
not an HTTP server) on a small Starlette app with two routes: `/read` returns a counter from an existing
session, `/write` increments it. Each client first makes its session; the rounds interleave the
contenders. Redis (no persistence) and PostgreSQL (initdb into a temporary directory, default durability:
fsync on, synchronous_commit on) are started here on loopback ports; PostgreSQL runs as an unprivileged
user when this runs as root.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import redis.asyncio
from common import free_port, wait_for
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the cluster the tests start too
from redis_cluster import RedisCluster


async def read(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(request.session.get("n", 0)))


async def write(request: Request) -> PlainTextResponse:
    session = request.session
    session["n"] = session.get("n", 0) + 1
    return PlainTextResponse(str(session["n"]))


ROUTES = [Route("/read", read), Route("/write", write)]
CONTENDERS = ["buntsession BuntStore", "buntsession RedisStore", "buntsession RedisStore, Redis Cluster",
              "buntsession PostgresStore", "starsessions RedisStore"]


def build(kind: str, redis_port: int, pg_dsn: str, workdir: str, cluster_port: int) -> Any:
    tag = time.monotonic_ns()
    if kind.startswith("starsessions"):
        from starsessions import SessionAutoloadMiddleware
        from starsessions import SessionMiddleware as StarSessions
        from starsessions.stores.redis import RedisStore as StarRedis

        star = StarRedis(connection=redis.asyncio.Redis(port=redis_port), prefix=f"star{tag}.")
        return Starlette(routes=ROUTES, middleware=[
            Middleware(StarSessions, store=star, cookie_https_only=False, lifetime=3600),
            Middleware(SessionAutoloadMiddleware)])
    from buntsession import DB, BuntStore, SessionMiddleware, Store
    from buntsession.postgres import PostgresStore
    from buntsession.redis import RedisStore

    store: Store
    if kind == "buntsession BuntStore":
        store = BuntStore(DB(os.path.join(workdir, f"{tag}.db")))
    elif kind == "buntsession RedisStore":
        store = RedisStore(redis.asyncio.Redis(port=redis_port), prefix=f"bunt{tag}:")
    elif kind == "buntsession RedisStore, Redis Cluster":
        store = RedisStore(redis.asyncio.RedisCluster(host="127.0.0.1", port=cluster_port), prefix=f"bunt{tag}:")
    else:
        store = PostgresStore(lambda: asyncpg.create_pool(pg_dsn, min_size=1, max_size=4), table=f"bench_{tag}")
    return Starlette(routes=ROUTES, middleware=[Middleware(SessionMiddleware, store=store, secret_key="bench")])


Results = dict[tuple[str, str], list[float]]


async def run(requests: int, rounds: int, redis_port: int, pg_dsn: str, workdir: str, cluster_port: int) -> Results:
    results: Results = {(k, r): [] for k in CONTENDERS for r in ("read", "write")}
    for _ in range(rounds):
        for kind in CONTENDERS:
            app = build(kind, redis_port, pg_dsn, workdir, cluster_port)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
                assert (await client.get("/write")).text == "1", kind  # the session exists from here on
                for route in ("read", "write"):
                    started = time.perf_counter()
                    for _ in range(requests):
                        await client.get(f"/{route}")
                    results[kind, route].append(requests / (time.perf_counter() - started))
                assert (await client.get("/read")).text == str(requests + 1), kind
    return results


def markdown(results: Results, requests: int, rounds: int) -> list[str]:
    """The section of docs/benchmarks.md (benchmarks/report.py adds it when both servers are installed)."""
    lines = ["## Stores for several hosts", "",
             f"`benchmarks/stores.py`: {requests:,} requests per route and round through httpx's ASGITransport,",
             f"{rounds} interleaved rounds, requests/s (median, min-max). `/read` reads a counter from an existing",
             "session, `/write` increments it. Redis (no persistence) and PostgreSQL (default durability: fsync",
             "and synchronous_commit on) run on loopback, started by the benchmark.", "",
             "| store | /read req/s | /write req/s |", "|---|---|---|"]
    for kind in CONTENDERS:
        cells = []
        for route in ("read", "write"):
            figures = results[kind, route]
            cells.append(f"{statistics.median(figures):.0f} ({min(figures):.0f}-{max(figures):.0f})")
        lines.append(f"| {kind} | {cells[0]} | {cells[1]} |")
    return lines


def postgres_bin() -> str:
    versions = sorted((int(p.parent.parent.name), str(p.parent))
                      for p in Path("/usr/lib/postgresql").glob("*/bin/postgres") if p.parent.parent.name.isdigit())
    if not versions:
        raise SystemExit("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    return versions[-1][1]


def start_postgres(port: int) -> tuple[subprocess.Popen[bytes], str]:
    """initdb into a directory of its own, then the server on a loopback port; as `nobody` when root."""
    bindir = postgres_bin()
    user = None
    if os.geteuid() == 0:
        user = "nobody"
        pwd.getpwnam(user)
    workdir = tempfile.mkdtemp(prefix="buntsession-bench-pg-", dir="/tmp")
    if user:
        shutil.chown(workdir, user)
    data = os.path.join(workdir, "data")
    subprocess.run([os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                    "--no-instructions"], user=user, check=True, stdout=subprocess.DEVNULL, cwd=workdir)
    server = subprocess.Popen([os.path.join(bindir, "postgres"), "-D", data, "-p", str(port), "-c",
                               "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={workdir}"],
                              user=user, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return server, workdir


def measure(requests: int, rounds: int) -> Results:
    """Start Redis and PostgreSQL on loopback ports, run the contenders, stop the servers."""
    redis_port, pg_port = free_port(), free_port()
    workdir = tempfile.mkdtemp(dir=".", prefix=".bench-")
    redis_server = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                     "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
    pg_server, pg_dir = start_postgres(pg_port)
    cluster = RedisCluster(workdir)
    try:
        cluster.start()
        wait_for(redis_port)
        deadline = time.monotonic() + 30  # the port opens a moment before the server accepts sessions
        while subprocess.run([os.path.join(postgres_bin(), "pg_isready"), "-q", "-h", "127.0.0.1", "-p",
                              str(pg_port)], check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit("PostgreSQL did not start")
            time.sleep(0.05)
        return anyio.run(run, requests, rounds, redis_port, f"postgresql://postgres@127.0.0.1:{pg_port}/postgres",
                         workdir, cluster.ports[0])
    finally:
        cluster.stop()
        redis_server.terminate()
        pg_server.send_signal(signal.SIGINT)  # a fast shutdown: the pools are still connected
        for server in (redis_server, pg_server):
            server.wait()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(pg_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = measure(args.requests, args.rounds)
    print(f"stores: {args.requests:,} requests per route per round through ASGITransport, {args.rounds} rounds; "
          "median req/s [min-max]")
    for route in ("read", "write"):
        print(f" /{route}")
        for kind in CONTENDERS:
            figures = results[kind, route]
            print(f"  {kind:<28}{statistics.median(figures):8.0f}  [{min(figures):.0f}-{max(figures):.0f}]")


def available() -> bool:
    """Whether both servers are installed (report.py skips this section otherwise)."""
    return shutil.which("redis-server") is not None and any(Path("/usr/lib/postgresql").glob("*/bin/postgres"))


if __name__ == "__main__":
    main()
