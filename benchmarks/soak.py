"""Soak: sessions created, touched, written, expired and destroyed for minutes, with autoshrink forced often.

    .venv/bin/python benchmarks/soak.py [--minutes 10]

Runs in-process through SessionMiddleware and BuntStore on a real file (autoshrink at 256 KiB and 50 %
growth, so it rewrites the file every few seconds), with short lifetimes (max_age 60 s, idle 20 s) so
sessions expire all the time. Checked once a second: the file stays within 2x the live data plus the
autoshrink minimum, and RSS after a one-minute warm-up grows less than 10 %. At the end: every rewrite
finished (none failed), and the file checks clean.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from buntsession import DB, BuntStore, SessionMiddleware
from buntsession.engine import format as fmt

MIN_SIZE = 256 * 1024


async def put(request: Request) -> PlainTextResponse:
    request.session.put_string("payload", "x" * random.randint(50, 400))
    return PlainTextResponse("ok")


async def incr(request: Request) -> PlainTextResponse:
    request.session.put_int("n", request.session.get_int("n") + 1)
    return PlainTextResponse("ok")


async def read(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(request.session.get_int("n")))


async def logout(request: Request) -> PlainTextResponse:
    request.session.destroy()
    return PlainTextResponse("ok")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Failures(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def request(app: Any, path: str, cookie: bytes | None) -> bytes | None:
    headers = [(b"cookie", b"session=" + cookie)] if cookie else []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "server": ("soak", 80), "client": ("127.0.0.1", 1)}
    new_cookie = None

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal new_cookie
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message
            for name, value in message.get("headers", []):
                if name == b"set-cookie" and (match := re.match(rb"session=([^;]*)", value)):
                    new_cookie = match[1]

    await app(scope, receive, send)
    return new_cookie


def live_bytes(db: DB) -> int:
    now = time.time()
    return fmt.FILE_HEADER_SIZE + sum(fmt.RECORD_HEADER_SIZE + len(k) + len(v) for k, (v, e) in
                                      list(db._data.items()) if e is None or e > now)


async def soak(minutes: float) -> None:
    failures = Failures()
    logging.getLogger("buntsession").addHandler(failures)
    rng = random.Random(1)
    path = os.path.join(tempfile.mkdtemp(dir=".", prefix=".bench-"), "soak.db")
    db = DB(path, autoshrink_min_size=MIN_SIZE, autoshrink_percentage=50, cleanup_interval=0.2)
    inner = Starlette(routes=[Route("/put", put), Route("/incr", incr), Route("/read", read),
                              Route("/logout", logout)])
    app = SessionMiddleware(inner, store=BuntStore(db), max_age=60, idle_timeout=20)
    cookies: list[bytes] = []
    started = time.monotonic()
    end = started + minutes * 60
    next_sample = started + 1
    warm_rss = 0
    worst_ratio, requests, samples = 0.0, 0, []
    while time.monotonic() < end:
        roll = rng.random()
        if roll < 0.15 or not cookies:
            cookie = await request(app, "/put", None)
            assert cookie is not None
            cookies.append(cookie)
        elif roll < 0.2:
            await request(app, "/logout", cookies.pop(rng.randrange(len(cookies))))
        elif roll < 0.25:
            cookies.pop(rng.randrange(len(cookies)))  # the browser goes away: the session expires
        else:
            cookie = cookies[rng.randrange(len(cookies))]
            await request(app, "/incr" if roll < 0.6 else "/read", cookie)
        requests += 1
        if len(cookies) > 3000:
            del cookies[:500]
        now = time.monotonic()
        if now >= next_sample:
            next_sample = now + 1
            size, live = os.path.getsize(path), live_bytes(db)
            worst_ratio = max(worst_ratio, (size - MIN_SIZE) / live)
            assert size <= 2 * live + MIN_SIZE, f"file {size} bytes with {live} live"
            if not warm_rss and now - started >= 60:
                warm_rss = rss()
            samples.append((now - started, size, live, rss()))
    shrinks, end_rss = db.stats().shrinks, rss()
    await db.close()
    grown = (end_rss - warm_rss) / warm_rss if warm_rss else float("nan")
    print(f"soak: {minutes:g} min, {requests:,} requests ({requests / (minutes * 60):.0f}/s), {shrinks} shrinks")
    print(f"  file: at most 2x live + {MIN_SIZE // 1024} KiB held at every one of {len(samples)} samples; "
          f"worst (file - min) / live = {worst_ratio:.2f}")
    print(f"  RSS: {warm_rss / 1e6:.1f} MB after warm-up, {samples[-1][3] / 1e6:.1f} MB at the end "
          f"({grown * 100:+.1f} %)")
    print(f"  errors logged: {len(failures.messages)} {failures.messages[:3]}")
    checked = subprocess.run([sys.executable, "-m", "buntsession", "check", path], capture_output=True,
                             text=True, check=False).stdout.strip()
    print(f"  check: {checked.splitlines()[-1] if checked else '?'}")
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    anyio.run(soak, parser.parse_args().minutes)
