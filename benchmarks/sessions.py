"""Session middleware benchmark: what each middleware adds to a request, all in one run.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/sessions.py            # in-process, a few minutes
    .venv/bin/python benchmarks/sessions.py --wrk      # also through a real uvicorn, driven by wrk

A Starlette app is called in-process, ASGI message by ASGI message, with `secret_key` set, through the
dict API every middleware shares, for: no session middleware, a floor (the least work a signed server-side
session needs, written here), Starlette's cookie SessionMiddleware, starsessions with its in-memory store,
and buntsession with BuntStore on a real file (sync="everysec", the default). Routes: `get` reads a small
session, `put` writes it, `incr` reads and writes a counter; `profile` reads a realistic session (a
signed-in user, a cart of five items as a list of dicts, preferences) and `cart` adds an item to its cart.
Each contender's app lives through one lifespan per round (its store opened at startup, closed at
shutdown). Rounds interleave the contenders; each figure is the median of the rounds, and what matters is
the time each middleware adds over the bare app.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from common import free_port, parse_wrk, wait_for
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

SECRET = "benchmark-secret"
USER = {"id": 4242, "name": "Ada Lovelace", "email": "ada@example.com", "roles": ["customer"]}
CART = [{"sku": f"SKU-{i:05d}", "name": f"Item number {i}", "qty": i % 3 + 1, "price": 9.99 + i} for i in range(5)]
PREFS = {"theme": "dark", "language": "en-GB", "currency": "GBP", "newsletter": True}


def session_of(request: Request) -> dict[str, Any]:
    return request.scope.get("session", {})  # the bare app works on a throwaway dict


async def put(request: Request) -> PlainTextResponse:
    session_of(request)["message"] = "Hello world!"
    return PlainTextResponse("ok")


async def get(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(session_of(request).get("message", "")))


async def incr(request: Request) -> PlainTextResponse:
    session = session_of(request)
    session["n"] = session.get("n", 0) + 1
    return PlainTextResponse(str(session["n"]))


async def sign_in(request: Request) -> PlainTextResponse:
    session = session_of(request)
    session["user"], session["cart"], session["prefs"] = USER, CART, PREFS
    return PlainTextResponse("ok")


async def profile(request: Request) -> PlainTextResponse:
    session = session_of(request)
    user, cart, prefs = session.get("user") or {}, session.get("cart") or [], session.get("prefs") or {}
    total = sum(item["qty"] * item["price"] for item in cart)
    return PlainTextResponse(f"{user.get('name')}: {len(cart)} items, {total:.2f} {prefs.get('currency')}")


async def cart(request: Request) -> PlainTextResponse:
    session = session_of(request)
    items = list(session.get("cart") or [])
    items.append({"sku": "SKU-99999", "name": "One more thing", "qty": 1, "price": 4.5})
    session["cart"] = items[-5:]  # five items, so the session keeps its size from request to request
    return PlainTextResponse(str(len(items)))


ROUTES = [Route("/put", put), Route("/get", get), Route("/incr", incr), Route("/sign_in", sign_in),
          Route("/profile", profile), Route("/cart", cart)]
SMALL = ("get", "incr", "put")
REALISTIC = ("profile", "cart")
PATHS = SMALL + REALISTIC


class FloorMiddleware:
    """The least work a signed, durable server-side session needs, and nothing more: find the cookie,
    check its HMAC-SHA256, hash the token, one dict lookup, json.loads; on a change one json.dumps and one
    framed os.write (a CRC'd record appended to a file). No expiry, no merge, no safety: a yardstick."""

    def __init__(self, app: Any, path: str) -> None:
        self.app = app
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.index: dict[str, bytes] = {}
        self.mac = hmac.new(hashlib.sha256(SECRET.encode()).digest(), digestmod=hashlib.sha256)
        self.find = re.compile(rb"(?:^|;) *session=([^;]*)").search

    def sign(self, token: bytes) -> bytes:
        mac = self.mac.copy()
        mac.update(token)
        return base64.urlsafe_b64encode(mac.digest())[:43]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = key = None
        data: dict[str, Any] = {}
        for name, value in scope["headers"]:
            if name == b"cookie" and (found := self.find(value)):
                cookie = found[1]
                if hmac.compare_digest(self.sign(cookie[:43]), cookie[44:]):
                    token = cookie[:43]
                    key = hashlib.sha256(token).hexdigest()
                    stored = self.index.get(key)
                    if stored is not None:
                        data = json.loads(stored)
                break
        session = scope["session"] = _Tracked(data)

        async def send_wrapper(message: Any) -> None:
            nonlocal token, key
            if message["type"] == "http.response.start" and session.changed:
                record = json.dumps(session).encode()
                if token is None:
                    token = base64.urlsafe_b64encode(os.urandom(32))[:43]
                    key = hashlib.sha256(token).hexdigest()
                    message.setdefault("headers", []).append(
                        (b"set-cookie", b"session=" + token + b"." + self.sign(token) + b"; path=/; httponly"))
                assert key is not None
                head = struct.pack("<II", len(record), zlib.crc32(record))
                os.write(self.fd, head + key.encode() + record)
                self.index[key] = record
            await send(message)

        await self.app(scope, receive, send_wrapper)


class _Tracked(dict[str, Any]):
    changed = False

    def __setitem__(self, key: str, value: Any) -> None:
        self.changed = True
        super().__setitem__(key, value)


def build(kind: str, workdir: str) -> Any:
    if kind == "bare":
        return Starlette(routes=ROUTES)
    if kind == "floor":
        return FloorMiddleware(Starlette(routes=ROUTES), os.path.join(workdir, f"floor-{time.monotonic_ns()}.log"))
    if kind == "starlette":
        from starlette.middleware.sessions import SessionMiddleware

        return Starlette(routes=ROUTES, middleware=[Middleware(SessionMiddleware, secret_key=SECRET)])
    if kind == "starsessions":
        from starsessions import InMemoryStore, SessionAutoloadMiddleware
        from starsessions import SessionMiddleware as StarSessions

        return Starlette(routes=ROUTES, middleware=[
            Middleware(StarSessions, store=InMemoryStore(), cookie_https_only=False, lifetime=14 * 24 * 3600),
            Middleware(SessionAutoloadMiddleware),
        ])
    if kind == "buntsession":
        from buntsession import DB, BuntStore, SessionMiddleware

        store = BuntStore(DB(os.path.join(workdir, f"sessions-{time.monotonic_ns()}.db")))
        return Starlette(routes=ROUTES, middleware=[Middleware(SessionMiddleware, store=store, secret_key=SECRET)])
    raise ValueError(kind)


CONTENDERS = ["bare", "floor", "starlette", "starsessions", "buntsession"]
PEERS = ["floor", "starlette", "starsessions"]
_COOKIE = re.compile(rb"^([^=]+)=([^;]*)")


class Client:
    """Calls an ASGI app directly and keeps the cookies it sets."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.cookies: dict[bytes, bytes] = {}

    async def request(self, path: str) -> int:
        cookie = b"; ".join(k + b"=" + v for k, v in self.cookies.items())
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"bench"), (b"cookie", cookie)] if cookie else [(b"host", b"bench")],
                 "server": ("bench", 80), "client": ("127.0.0.1", 1234), "state": {}}
        status = 0

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", []):
                    if name == b"set-cookie" and (match := _COOKIE.match(value)):
                        self.cookies[match[1]] = match[2]

        await self.app(scope, receive, send)
        return status


@asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """Run the app's lifespan around the block: startup before it, shutdown after, in one lifespan task."""
    to_app_send, to_app = anyio.create_memory_object_stream[dict[str, Any]](2)
    from_app_send, from_app = anyio.create_memory_object_stream[dict[str, Any]](2)

    async def run() -> None:
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, to_app.receive, from_app_send.send)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await to_app_send.send({"type": "lifespan.startup"})
        answer = await from_app.receive()
        if answer["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"startup failed: {answer}")
        try:
            yield
        finally:
            await to_app_send.send({"type": "lifespan.shutdown"})
            answer = await from_app.receive()
            if answer["type"] != "lifespan.shutdown.complete":
                raise RuntimeError(f"shutdown failed: {answer}")


async def in_process(requests: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per contender and route, the seconds per request of each round (also printed)."""
    workdir = tempfile.mkdtemp(dir=".", prefix=".bench-")
    results: dict[str, dict[str, list[float]]] = {k: {p: [] for p in PATHS} for k in CONTENDERS}
    try:
        for _ in range(rounds):
            for kind in CONTENDERS:
                app = build(kind, workdir)
                async with lifespan(app):
                    small, realistic = Client(app), Client(app)
                    assert await small.request("/put") == 200
                    assert await realistic.request("/sign_in") == 200
                    for _ in range(requests // 10):  # warm up
                        await small.request("/get")
                        await realistic.request("/profile")
                    for path in PATHS:
                        client = realistic if path in REALISTIC else small
                        started = time.perf_counter()
                        for _ in range(requests):
                            await client.request(f"/{path}")
                        results[kind][path].append((time.perf_counter() - started) / requests)
                    if kind != "bare":
                        assert small.cookies and realistic.cookies, kind
                        assert await realistic.request("/profile") == 200
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(results, requests, rounds)
    return results


def added_over_bare(results: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """µs each contender adds per route: its median minus the bare app's."""
    bare = {p: statistics.median(v) for p, v in results["bare"].items()}
    return {k: {p: statistics.median(v) - bare[p] for p, v in routes.items()} for k, routes in results.items()}


def report(results: dict[str, dict[str, list[float]]], requests: int, rounds: int) -> None:
    print(f"\nin-process, {requests:,} requests per route per round, {rounds} rounds; median µs per request")
    print(f"  {'':<14}" + "".join(f"{p:>9}" for p in PATHS) + "    added over bare")
    added = added_over_bare(results)
    for kind in CONTENDERS:
        med = {p: statistics.median(v) for p, v in results[kind].items()}
        extra = "" if kind == "bare" else "  " + " / ".join(f"{added[kind][p] * 1e6:5.1f}" for p in PATHS)
        print(f"  {kind:<14}" + "".join(f"{med[p] * 1e6:9.1f}" for p in PATHS) + extra)
    for other in PEERS:
        ratios = " / ".join(f"{added['buntsession'][p] / added[other][p]:.2f}" for p in PATHS)
        print(f"  buntsession adds {ratios}× what {other} adds ({'/'.join(PATHS)})")


APP_MODULE = '''
import os, sys
sys.path.insert(0, {bench_dir!r})
from sessions import build
app = build(os.environ["BENCH_KIND"], os.environ["BENCH_DIR"])
'''


WRK_CONTENDERS = ["bare", "starlette", "starsessions", "buntsession"]
WRK_PATHS = ("get", "incr")


def fixed_cookie(port: int) -> str | None:
    """The cookie of a session holding the small session's message, made by the server itself."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/put") as response:
        cookie = response.headers.get("set-cookie")
    return None if cookie is None else cookie.split(";", 1)[0]


def through_uvicorn(seconds: int, rounds: int, connections: int) -> dict[str, dict[str, list[dict[str, float]]]]:
    """Each contender under a real uvicorn (one worker), wrk on loopback sending one fixed session cookie
    (made by a first request to /put); per contender and route, wrk's report of each round (also printed)."""
    results: dict[str, dict[str, list[dict[str, float]]]] = {k: {p: [] for p in WRK_PATHS} for k in WRK_CONTENDERS}
    if shutil.which("wrk") is None:
        print("\nwrk is not installed (Debian: apt-get install wrk): skipping the uvicorn run")
        return results
    workdir = tempfile.mkdtemp(dir=".", prefix=".bench-")
    module_dir = tempfile.mkdtemp(prefix="bench-app-")
    with open(os.path.join(module_dir, "bench_app.py"), "w") as f:
        f.write(APP_MODULE.format(bench_dir=os.path.dirname(os.path.abspath(__file__))))
    try:
        for _ in range(rounds):
            for path in WRK_PATHS:
                for kind in WRK_CONTENDERS:
                    port = free_port()
                    env = {**os.environ, "BENCH_KIND": kind, "BENCH_DIR": workdir, "PYTHONPATH": module_dir}
                    server = subprocess.Popen(
                        [sys.executable, "-m", "uvicorn", "bench_app:app", "--port", str(port), "--log-level",
                         "warning", "--no-access-log"], env=env)
                    try:
                        wait_for(port)
                        cookie = fixed_cookie(port)
                        assert (cookie is None) == (kind == "bare"), kind
                        header = ["-H", f"Cookie: {cookie}"] if cookie else []
                        out = subprocess.run(
                            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", *header,
                             f"http://127.0.0.1:{port}/{path}"],
                            capture_output=True, text=True, check=True, timeout=seconds + 60)
                    finally:
                        server.send_signal(signal.SIGINT)
                        server.wait(timeout=30)
                    results[kind][path].append(parse_wrk(out.stdout))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(module_dir, ignore_errors=True)
    print(f"\nuvicorn on loopback, wrk -t1 -c{connections} -d{seconds}s, one fixed session cookie, {rounds} rounds; "
          "medians")
    print(f"  {'':<14}{'route':>7}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for kind in WRK_CONTENDERS:
        for path in WRK_PATHS:
            runs = results[kind][path]
            rps, p50, p99 = (statistics.median(r[m] for r in runs) for m in ("rps", "p50", "p99"))
            print(f"  {kind:<14}{path:>7}{rps:10.0f}{p50:9.2f}{p99:9.2f}{sum(r['errors'] for r in runs):8.0f}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--wrk", action="store_true", help="also serve each app with uvicorn and load it with wrk")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    print(f"session middleware benchmark: Python {sys.version.split()[0]}, {os.cpu_count()} cores")
    anyio.run(in_process, args.requests, args.rounds)
    if args.wrk:
        through_uvicorn(args.seconds, max(1, args.rounds // 3), args.connections)
