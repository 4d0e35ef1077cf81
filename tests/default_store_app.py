"""An app on the default store (no `store=`), for test_server.py: each response names the worker's pid."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from buntsession import SessionMiddleware

PID = {"x-pid": str(os.getpid())}


async def put(request: Request) -> PlainTextResponse:
    request.session.put_string("value", request.query_params["value"])
    return PlainTextResponse("ok", headers=PID)


async def get(request: Request) -> PlainTextResponse:
    return PlainTextResponse(request.session.get_string("value"), headers=PID)


app = SessionMiddleware(Starlette(routes=[Route("/", get), Route("/put", put), Route("/get", get)]),
                        secret_key="workers")
