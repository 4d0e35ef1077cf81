"""Loopback load: uvicorn (one worker) with buntsession, driven by wrk over 10,000 existing sessions.

    .venv/bin/pip install -e '.[bench]'     # and Debian's wrk
    .venv/bin/python benchmarks/load.py [--seconds 20] [--sessions 10000]

For sync="everysec" and sync="always", and for a route that only reads the session and one that writes it,
wrk runs with a Lua script that rotates the pre-created session cookies. Reported: req/s, p50/p99/max
latency, errors (non-2xx and socket errors), and the longest event-loop stall a probe task inside the
server saw (a 10 ms sleep that woke late). wrk measures from send to receive with a fixed number of
connections, so a slow response delays the next request (coordinated omission): max and p99 understate
what an open-loop load would see.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import anyio
from common import free_port, parse_wrk, wait_for

APP = '''
import os, time, anyio
from contextlib import asynccontextmanager
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from buntsession import DB, BuntStore, SessionMiddleware

stall = {"max": 0.0}

async def probe():
    while True:
        started = time.perf_counter()
        await anyio.sleep(0.01)
        stall["max"] = max(stall["max"], time.perf_counter() - started - 0.01)

@asynccontextmanager
async def lifespan(app):
    async with anyio.create_task_group() as tg:
        tg.start_soon(probe)
        yield
        tg.cancel_scope.cancel()

async def read(request):
    return PlainTextResponse(str(request.session.get_int("n")))

async def write(request):
    request.session.put_int("n", request.session.get_int("n") + 1)
    return PlainTextResponse("ok")

async def stalls(request):
    worst, stall["max"] = stall["max"], 0.0
    return JSONResponse(worst)

inner = Starlette(routes=[Route("/read", read), Route("/write", write), Route("/stall", stalls)], lifespan=lifespan)
store = BuntStore(DB(os.environ["LOAD_DB"], sync=os.environ["LOAD_SYNC"],
                     shared=os.environ.get("LOAD_SHARED") == "1"))
app = SessionMiddleware(inner, secret_key="load", store=store)
'''

LUA = '''
local cookies = {}
for line in io.lines("%s") do cookies[#cookies + 1] = line end
local i = 0
request = function()
  i = i %% #cookies + 1
  wrk.headers["Cookie"] = "session=" .. cookies[i]
  return wrk.format(nil)
end
'''


async def create_sessions(path: str, count: int) -> list[str]:
    """Sessions as the middleware writes them, straight into the file; returns their signed cookies."""
    from buntsession import DB, BuntStore
    from buntsession.codec import Meta, encode_record
    from buntsession.session import new_token, store_key
    from buntsession.signing import CookieSigner

    signer = CookieSigner("load")
    cookies = []
    now = time.time()
    async with DB(path, sync="never") as db:
        store = BuntStore(db)
        for _ in range(count):
            token = new_token()
            meta = Meta(created=now, end=now + 14 * 24 * 3600)
            await store.commit(store_key(token), encode_record(meta, {"n": 0}), meta.end)
            cookies.append(signer.sign(token))
    return cookies


def prepare(workdir: str, db_path: str, sessions: int) -> str:
    """Create `sessions` sessions in `db_path`; return the path of a wrk script that rotates their cookies."""
    cookies = anyio.run(create_sessions, db_path, sessions)
    cookie_file = os.path.join(workdir, "cookies.txt")
    with open(cookie_file, "w") as f:
        f.write("\n".join(cookies) + "\n")
    lua = os.path.join(workdir, "rotate.lua")
    with open(lua, "w") as f:
        f.write(LUA % cookie_file)
    return lua


async def mass_expiry(count: int) -> None:
    """`count` sessions expiring within one second, while a probe request runs every 10 ms."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from buntsession import DB, BuntStore, SessionMiddleware
    from buntsession.codec import Meta, encode_record
    from buntsession.session import new_token, store_key

    async def read(request: object) -> PlainTextResponse:
        return PlainTextResponse(str(request.session.get_int("n")))  # type: ignore[attr-defined]

    workdir = tempfile.mkdtemp(dir=".", prefix=".bench-")
    db = DB(os.path.join(workdir, "expiry.db"))
    store = BuntStore(db)
    app = SessionMiddleware(Starlette(routes=[Route("/read", read)]), store=store)
    try:
        async with store:
            now = time.time()
            expires = now + 8 + count / 50_000  # after the writes below are done
            for _ in range(count):
                meta = Meta(created=now, end=expires + (_ % 1000) / 1000)
                await store.commit(store_key(new_token()), encode_record(meta, {"n": 1}), meta.end)
            probe = new_token()
            meta = Meta(created=now, end=now + 3600)
            await store.commit(store_key(probe), encode_record(meta, {"n": 7}), meta.end)
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                     "scheme": "http", "path": "/read", "raw_path": b"/read", "query_string": b"", "root_path": "",
                     "headers": [(b"cookie", b"session=" + probe.encode())], "server": ("b", 80)}

            async def receive() -> dict[str, object]:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message: dict[str, object]) -> None:
                if message["type"] == "http.response.body":
                    assert message["body"] == b"7"

            worst, probes = 0.0, 0
            while len(db._data) > 1 or time.time() < expires + 1.5:  # until the cleanup drained memory
                started = time.perf_counter()
                await app(dict(scope), receive, send)
                worst = max(worst, time.perf_counter() - started)
                probes += 1
                await anyio.sleep(0.01)
            print(f"mass expiry: {count:,} sessions expired within one second; {probes} probe requests, "
                  f"the slowest {worst * 1000:.2f} ms; longest cleanup batch {db._cleanup_max_hold * 1000:.2f} ms")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--mass-expiry", type=int, default=200_000, metavar="N",
                        help="sessions for the mass-expiry probe (0: skip it)")
    args = parser.parse_args()
    if args.mass_expiry:
        anyio.run(mass_expiry, args.mass_expiry)
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    workdir = tempfile.mkdtemp(dir=".", prefix=".bench-")
    try:
        with open(os.path.join(workdir, "load_app.py"), "w") as f:
            f.write(APP)
        print(f"loopback load: uvicorn, 1 worker, {args.sessions:,} sessions, wrk -t1 -c{args.connections} "
              f"-d{args.seconds}s; Python {sys.version.split()[0]}, {os.cpu_count()} cores")
        print(f"  {'sync':<9}{'route':<7}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>8}"
              f"{'stall ms':>10}")
        for sync in ("everysec", "always"):
            db_path = os.path.join(workdir, f"load-{sync}.db")
            lua = prepare(workdir, db_path, args.sessions)
            port = free_port()
            env = {**os.environ, "LOAD_DB": db_path, "LOAD_SYNC": sync, "PYTHONPATH": workdir}
            server = subprocess.Popen([sys.executable, "-m", "uvicorn", "load_app:app", "--port", str(port),
                                       "--log-level", "warning", "--no-access-log"], env=env)
            try:
                wait_for(port)
                for route in ("read", "write"):
                    subprocess.run(["curl", "-s", f"http://127.0.0.1:{port}/stall"], capture_output=True, check=False)
                    out = subprocess.run(["wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds}s", "--latency",
                                          "-s", lua, f"http://127.0.0.1:{port}/{route}"],
                                         capture_output=True, text=True, check=True)
                    stall = json.loads(subprocess.run(["curl", "-s", f"http://127.0.0.1:{port}/stall"],
                                                      capture_output=True, text=True, check=True).stdout)
                    r = parse_wrk(out.stdout)
                    print(f"  {sync:<9}{route:<7}{r['rps']:9.0f}{r['p50']:9.2f}{r['p99']:9.2f}{r['max']:9.2f}"
                          f"{r['errors']:8.0f}{stall * 1000:10.2f}")
            finally:
                server.send_signal(signal.SIGINT)
                server.wait(timeout=30)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
