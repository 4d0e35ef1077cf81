"""The README's example: a FastAPI app with server-side sessions on the embedded engine.

Run it from the checkout:  .venv/bin/uvicorn examples.app:app   (or with --workers 4: it just works)
Sessions are kept in ./sessions.db, the default store (BUNTSESSION_PATH names another file); uvicorn's log
says where when it starts.
Then, keeping the cookie between calls:
    curl -c jar -b jar localhost:8000/put
    curl -c jar -b jar localhost:8000/get              -> "Hello world!"
    curl -c jar -b jar -X POST localhost:8000/login    (a new token, same data)
    curl -c jar -b jar -X POST localhost:8000/logout   (the session is gone)
"""

from __future__ import annotations

import os

from fastapi import FastAPI, Request

from buntsession import SessionMiddleware
from buntsession.fastapi import SessionDep

app = FastAPI()
app.add_middleware(SessionMiddleware, secret_key=os.environ.get("SESSION_SECRET", "change-me"))


@app.get("/put")
async def put(request: Request) -> dict[str, str]:
    request.state.session.put_string("message", "Hello world!")
    return {"status": "stored"}


@app.get("/get")
async def get(request: Request) -> str:
    message: str = request.state.session.get_string("message")
    return message


@app.get("/visits")
async def visits(session: SessionDep) -> int:
    session.put_int("visits", session.get_int("visits") + 1)
    return session.get_int("visits")


@app.post("/login")
async def login(session: SessionDep) -> dict[str, str]:
    session.renew_token()  # a new token at every change of privilege stops session fixation
    session.put_string("user", "alice")
    return {"status": "logged in"}


@app.post("/logout")
async def logout(session: SessionDep) -> dict[str, str]:
    session.destroy()
    return {"status": "logged out"}
