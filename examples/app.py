"""A small FastAPI app on the embedded engine: a visit counter and a key/value API with expiry.

Run it from the checkout:  .venv/bin/uvicorn --app-dir examples app:app
Then:  curl localhost:8000/            (counts visits; the count survives restarts)
       curl -X PUT localhost:8000/kv/greeting?ttl=60 -d 'hello'
       curl localhost:8000/kv/greeting
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request, Response

from buntsession import DB

db = DB(os.environ.get("EXAMPLE_DB", "example.db"))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with db:  # lock and load the file at startup; fsync and release it at shutdown
        yield


app = FastAPI(lifespan=lifespan)


@app.get("/")
async def visits() -> dict[str, int]:
    count = int(await db.get("visits") or b"0") + 1
    await db.set("visits", str(count).encode())
    return {"visits": count, "keys": len(db)}


@app.put("/kv/{key}", status_code=204)
async def put(key: str, request: Request, ttl: float | None = None) -> Response:
    await db.set(f"kv:{key}", await request.body(), ttl=ttl)
    return Response(status_code=204)


@app.get("/kv/{key}")
async def get(key: str) -> Response:
    value = await db.get(f"kv:{key}")
    if value is None:
        raise HTTPException(404, "absent or expired")
    ttl = await db.ttl(f"kv:{key}")
    headers = {} if ttl is None else {"X-TTL": f"{ttl:.1f}"}
    return Response(value, media_type="application/octet-stream", headers=headers)


@app.get("/stats")
async def stats() -> dict[str, int]:
    s = db.stats()
    return {"keys": s.keys, "expired": s.expired, "file_size": s.file_size, "fsyncs": s.fsyncs, "shrinks": s.shrinks}
