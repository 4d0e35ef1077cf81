"""The app each worker process of test_workers.py serves: sessions on one file, DB(shared=True)."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from buntsession import DB, BuntStore, SessionMiddleware


async def incr(request: Request) -> PlainTextResponse:
    session = request.session
    session.put_int("n", session.get_int("n") + 1)
    session.put_string("by", str(os.getpid()))
    return PlainTextResponse(str(session.get_int("n")))


async def read(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(request.session.get_int("n")))


db = DB(os.environ["WORKER_DB"], shared=True, autoshrink_min_size=32 * 1024, autoshrink_percentage=50,
        cleanup_interval=0.2, lock_timeout=5)
app = SessionMiddleware(Starlette(routes=[Route("/incr", incr), Route("/read", read)]), store=BuntStore(db),
                        secret_key="workers")
