"""Sessions of a user: listing and ending them with many sessions of other users in the store, one run.

    .venv/bin/pip install -e '.[bench]'     # and Debian's redis-server
    .venv/bin/python benchmarks/user_sessions.py [--others 100000] [--mine 10] [--reps 200]

For BuntStore (a real file, sync="everysec"), MemoryStore and RedisStore (a redis-server started here on a
loopback port, no persistence): the store is filled with sessions of other users (logged in through the
session lifecycle, five per user), first 1,000, then `--others`; at each size, `store.user_sessions(user)`
for a user with `--mine` sessions is timed (median of `--reps` calls), and `store.end_user_sessions(user)`
(median of reps/4, the user's sessions logged in again before each, untimed). Ending includes the fsync
that makes it durable. For BuntStore, the same listing done the way it is without an index (scan every
key, read and decode each record) is timed too. What matters: the time at the large size over the time at
the small one (1.0 = independent of the other sessions).
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
import redis.asyncio
from common import redis_server

from buntsession import DB, BuntStore, MemoryStore
from buntsession.codec import decode_meta
from buntsession.lifecycle import Lifecycle
from buntsession.redis import RedisStore

USER = "target@example.com"


async def log_in(life: Lifecycle, user: str) -> None:
    session = await life.load(None)
    session.put_object("cart", [{"sku": "SKU-1", "qty": 1}])
    session.login(user)
    await life.commit(session, ok=True, request_headers=[(b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64)")])


async def fill(life: Lifecycle, start: int, stop: int) -> None:
    for n in range(start, stop):
        await log_in(life, f"user-{n // 5}@example.com")


async def median_us(call: Any, reps: int, before: Any = None) -> float:
    times = []
    for _ in range(reps):
        if before is not None:
            await before()
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


async def scan_listing(db: DB) -> int:
    """A user's sessions found without an index: every key scanned, every record read and decoded."""
    found = 0
    async for key in db.scan("session:"):
        value = await db.get(key)
        if value is not None and len(key) == 72:
            try:
                if decode_meta(value).user == USER:
                    found += 1
            except ValueError:
                pass
    return found


async def measure(name: str, store: Any, sizes: list[int], mine: int, reps: int, db: DB | None) -> None:
    life = Lifecycle(store, 24 * 3600)
    filled = 0
    rows = []
    for size in sizes:
        await fill(life, filled, size)
        filled = size

        async def again() -> None:
            for _ in range(mine):
                await log_in(life, USER)

        await again()
        assert len(await store.user_sessions(USER)) == mine
        listing = await median_us(lambda: store.user_sessions(USER), reps)
        assert await store.end_user_sessions(USER) == mine  # each timed ending starts from `mine` fresh ones
        ending = await median_us(lambda: store.end_user_sessions(USER), max(5, reps // 4), before=again)
        await again()
        scan = None
        if db is not None:
            assert await scan_listing(db) == mine
            scan = await median_us(lambda: scan_listing(db), 3)
        assert await store.end_user_sessions(USER) == mine
        rows.append((size, listing, ending, scan))
    print(f"  {name}")
    for size, listing, ending, scan in rows:
        extra = f"   without an index (scan): {scan / 1000:9.1f} ms" if scan is not None else ""
        print(f"    {size:>8,} other sessions: list {listing:8.1f} µs   end {ending:8.1f} µs{extra}")
    (_, l0, e0, s0), (_, l1, e1, s1) = rows[0], rows[-1]
    ratio = f"    ratio {rows[-1][0]:,} / {rows[0][0]:,} others: list {l1 / l0:.2f}x, end {e1 / e0:.2f}x"
    if s0 is not None and s1 is not None:
        ratio += f", scan {s1 / s0:.1f}x; at {rows[-1][0]:,} the index lists {s1 / l1:,.0f}x faster than a scan"
    print(ratio)


async def run(others: int, mine: int, reps: int, port: int, workdir: str) -> None:
    sizes = [1_000, others]
    print(f"sessions of a user: {mine} sessions of one user, listed and ended, with other users' sessions in the "
          f"store; median per call")
    async with DB(os.path.join(workdir, "bench.db")) as db:
        await measure("BuntStore (file, sync=everysec)", BuntStore(db), sizes, mine, reps, db)
    await measure("MemoryStore", MemoryStore(), sizes, mine, reps, None)
    client = redis.asyncio.Redis(port=port)
    await measure("RedisStore (loopback redis-server)", RedisStore(client, prefix="bench:"), sizes, mine, reps, None)
    await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--others", type=int, default=100_000)
    parser.add_argument("--mine", type=int, default=10)
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(dir=".", prefix=".bench-")
    try:
        with redis_server(workdir) as port:
            anyio.run(run, args.others, args.mine, args.reps, port, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
