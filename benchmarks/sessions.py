"""Session middleware benchmark: what each middleware adds to a request, all in one run.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/sessions.py            # in-process, a minute or two
    .venv/bin/python benchmarks/sessions.py --wrk      # also through a real uvicorn, driven by wrk

A small Starlette app (routes that put, get and increment, through the dict API every middleware shares)
is called in-process, ASGI message by ASGI message, with `secret_key` set, for: no session middleware,
Starlette's cookie SessionMiddleware, starsessions with its in-memory store, and buntsession with BuntStore
on a real file (sync="everysec", the default). Rounds interleave the contenders; each figure is the median
of the rounds, and what matters is the time each middleware adds over the bare app.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import anyio
from common import free_port, parse_wrk, wait_for
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

SECRET = "benchmark-secret"


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


ROUTES = [Route("/put", put), Route("/get", get), Route("/incr", incr)]


def build(kind: str, workdir: str) -> Any:
    if kind == "bare":
        return Starlette(routes=ROUTES)
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


CONTENDERS = ["bare", "starlette", "starsessions", "buntsession"]
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


async def lifespan(app: Any, event: str) -> None:
    """Send one lifespan event (startup or shutdown) and wait for its answer."""
    messages = [{"type": f"lifespan.{event}"}]
    done = anyio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await done.wait()
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(app, {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
        await done.wait()
        tg.cancel_scope.cancel()


async def in_process(requests: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per contender and route, the seconds per request of each round (also printed)."""
    workdir = tempfile.mkdtemp(dir=".", prefix=".bench-")
    paths = ("get", "incr", "put")
    results: dict[str, dict[str, list[float]]] = {k: {p: [] for p in paths} for k in CONTENDERS}
    try:
        for _ in range(rounds):
            for kind in CONTENDERS:
                app = build(kind, workdir)
                await lifespan(app, "startup")
                client = Client(app)
                assert await client.request("/put") == 200
                for _ in range(requests // 10):  # warm up
                    await client.request("/get")
                for path in paths:
                    started = time.perf_counter()
                    for _ in range(requests):
                        await client.request(f"/{path}")
                    results[kind][path].append((time.perf_counter() - started) / requests)
                if kind != "bare":
                    assert await client.request("/get") == 200 and client.cookies, kind
                await lifespan(app, "shutdown")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nin-process, {requests:,} requests per route per round, {rounds} rounds; median µs per request")
    print(f"  {'':<14}" + "".join(f"{p:>10}" for p in ("get", "incr", "put")) + "    added over bare (get/incr/put)")
    bare = {p: statistics.median(v) for p, v in results["bare"].items()}
    added: dict[str, dict[str, float]] = {}
    for kind in CONTENDERS:
        med = {p: statistics.median(v) for p, v in results[kind].items()}
        added[kind] = {p: med[p] - bare[p] for p in med}
        extra = "" if kind == "bare" else "  " + " / ".join(f"{added[kind][p] * 1e6:6.1f}" for p in med)
        print(f"  {kind:<14}" + "".join(f"{med[p] * 1e6:10.1f}" for p in med) + extra)
    for other in ("starlette", "starsessions"):
        ratios = " / ".join(f"{added['buntsession'][p] / added[other][p]:.2f}" for p in ("get", "incr", "put"))
        print(f"  buntsession adds {ratios}× what {other} adds (get/incr/put)")
    return results


APP_MODULE = '''
import os, sys
sys.path.insert(0, {bench_dir!r})
from sessions import build
app = build(os.environ["BENCH_KIND"], os.environ["BENCH_DIR"])
'''


def through_uvicorn(seconds: int, rounds: int) -> None:
    if shutil.which("wrk") is None:
        print("\nwrk is not installed (Debian: apt-get install wrk): skipping the uvicorn run")
        return
    workdir = tempfile.mkdtemp(dir=".", prefix=".bench-")
    module_dir = tempfile.mkdtemp(prefix="bench-app-")
    with open(os.path.join(module_dir, "bench_app.py"), "w") as f:
        f.write(APP_MODULE.format(bench_dir=os.path.dirname(os.path.abspath(__file__))))
    lua = os.path.join(module_dir, "cookie.lua")
    with open(lua, "w") as f:
        # Each wrk connection keeps the cookie it was given, like a browser would.
        f.write('local c = nil\nrequest = function() if c then wrk.headers["Cookie"] = c end '
                'return wrk.format(nil) end\nresponse = function(status, headers, body) '
                'local s = headers["set-cookie"] or headers["Set-Cookie"] '
                'if s then c = s:match("^([^;]+)") end end\n')
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in CONTENDERS}
    try:
        for _ in range(rounds):
            for kind in CONTENDERS:
                port = free_port()
                env = {**os.environ, "BENCH_KIND": kind, "BENCH_DIR": workdir, "PYTHONPATH": module_dir}
                server = subprocess.Popen(
                    [sys.executable, "-m", "uvicorn", "bench_app:app", "--port", str(port), "--log-level", "warning",
                     "--no-access-log"], env=env)
                wait_for(port)
                out = subprocess.run(["wrk", "-t1", "-c16", f"-d{seconds}s", "--latency", "-s", lua,
                                      f"http://127.0.0.1:{port}/incr"], capture_output=True, text=True, check=True)
                server.send_signal(signal.SIGINT)
                server.wait(timeout=30)
                report = parse_wrk(out.stdout)
                results[kind].append((report["rps"], report["p50"], report["p99"]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(module_dir, ignore_errors=True)
    print(f"\nuvicorn on loopback, wrk -t1 -c16 -d{seconds}s on /incr (a read and a write per request), "
          f"{rounds} rounds; medians")
    print(f"  {'':<14}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for kind in CONTENDERS:
        rps, p50, p99 = (statistics.median(x[i] for x in results[kind]) for i in range(3))
        print(f"  {kind:<14}{rps:10.0f}{p50:10.2f}{p99:10.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--wrk", action="store_true", help="also serve each app with uvicorn and load it with wrk")
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    print(f"session middleware benchmark: Python {sys.version.split()[0]}, {os.cpu_count()} cores")
    anyio.run(in_process, args.requests, args.rounds)
    if args.wrk:
        through_uvicorn(args.seconds, max(1, args.rounds // 3))
