"""Engine benchmark: `DB` against its floors and sqlite3, all in one run.

    .venv/bin/python benchmarks/engine.py            # the full run (a few minutes)
    .venv/bin/python benchmarks/engine.py --quick    # smaller sizes, for a smoke test

Each comparison runs its contenders interleaved, round after round, in this one process, and reports
the median per-operation time with the min-max over rounds and the ratio of the medians: the machines
are shared and noisy, so only ratios from one run mean anything. Files live in a temporary directory
under the working directory (a real disk, not tmpfs).
"""

from __future__ import annotations

import argparse
import gc
import heapq
import itertools
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel

from buntsession import DB
from buntsession.engine import format as fmt

VALUE_SIZE = 200
TTL = 3600.0


def session_keys(n: int, tag: str = "") -> list[str]:
    # A session key as the middleware makes it: prefix + SHA-256 hex of the token.
    return [f"session:{tag}{i:064x}"[-72:] for i in range(n)]


class Series:
    """Per-op seconds of one contender over the rounds."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.samples: list[float] = []

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def line(self, baseline: Series | None, unit: float = 1e6, suffix: str = "µs") -> str:
        lo, hi = min(self.samples) * unit, max(self.samples) * unit
        ratio = f"{self.median / baseline.median:6.2f}×" if baseline else "  base "
        return f"  {self.name:<44} {self.median * unit:9.3f} {suffix}  [{lo:.3f}-{hi:.3f}]  {ratio}"


async def timed(n: int, body: Callable[[], Awaitable[None]]) -> float:
    gc.collect()
    started = time.perf_counter()
    await body()
    return (time.perf_counter() - started) / n


# -- set and get ------------------------------------------------------------------------------------------


async def bench_set_get(workdir: str, n: int, rounds: int) -> dict[str, list[Series]]:
    keys = session_keys(n)
    value = os.urandom(VALUE_SIZE)
    record = fmt.encode_record(fmt.SET, keys[0].encode(), value, time.time() + TTL)

    raw = Series(f"os.write of one {len(record)}-byte record")
    floor = Series("minimal async set: frame, os.write, dict, heap (floor)")
    db_set = Series('DB.set, sync="everysec" (default)')
    db_set_never = Series('DB.set, sync="never"')
    db_update = Series("DB.update, as BuntStore.merge calls it")
    lite = Series("sqlite3 WAL, synchronous=NORMAL, 1 txn/write")
    dict_get = Series("async dict lookup with an expiry check (floor)")
    db_get = Series("DB.get (hit, key with TTL)")
    lite_get = Series("sqlite3 SELECT by key")

    async def raw_round(r: int) -> None:
        fd = os.open(f"{workdir}/raw-{r}", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)

        async def raw_loop() -> None:
            for _ in keys:
                os.write(fd, record)

        raw.samples.append(await timed(n, raw_loop))
        os.close(fd)

    async def floor_round(r: int) -> None:
        # The floor written for the purpose: what any Python engine must do per set (the same record
        # format and checksums, one os.write, a dict and an expiry heap), and nothing else.
        fd = os.open(f"{workdir}/floor-{r}", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        index: dict[str, tuple[bytes, float | None]] = {}
        heap: list[tuple[float, str]] = []
        encode, write, now, push, SET = fmt.encode_record, os.write, time.time, heapq.heappush, fmt.SET
        salt = fmt.new_file_header().salt

        async def floor_set(key: str, value: bytes, ttl: float) -> None:
            exp = now() + ttl
            write(fd, encode(SET, key.encode(), value, exp, salt))
            index[key] = (value, exp)
            push(heap, (exp, key))

        async def floor_loop() -> None:
            for key in keys:
                await floor_set(key, value, TTL)

        floor.samples.append(await timed(n, floor_loop))
        os.close(fd)

    async def set_round(r: int, series: Series, sync: str) -> None:
        db = DB(f"{workdir}/db-{sync}-{r}", sync=sync)  # type: ignore[arg-type]
        async with db:

            async def set_loop() -> None:
                for key in keys:
                    await db.set(key, value, ttl=TTL)

            series.samples.append(await timed(n, set_loop))
            if sync == "never":

                async def get_loop() -> None:
                    for key in keys:
                        await db.get(key)

                db_get.samples.append(await timed(n, get_loop))

    async def update_round(r: int) -> None:
        # The session store's write path: BuntStore.merge hands DB.update a change function (its Update's
        # `planned`) that gets the stored record and returns the new one with its absolute expiry (here:
        # the value as it is given).
        db = DB(f"{workdir}/db-update-{r}")
        expires = time.time() + TTL
        async with db:

            async def update_loop() -> None:
                for key in keys:
                    await db.update(key, lambda old: (value, expires))

            db_update.samples.append(await timed(n, update_loop))

    contenders: list[Callable[[int], Awaitable[None]]] = [
        raw_round, floor_round, lambda r: set_round(r, db_set, "everysec"),
        lambda r: set_round(r, db_set_never, "never"), update_round]
    for r in range(rounds):
        # Interleaved, in a rotating order: the one that follows big unsynced writes may meet the kernel's
        # writeback of them, so no contender always comes first or last.
        for contender in contenders[r % len(contenders):] + contenders[: r % len(contenders)]:
            await contender(r)

        con = sqlite3.connect(f"{workdir}/lite-{r}.sqlite", isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v BLOB, exp REAL)")

        async def lite_loop() -> None:
            for key in keys:
                con.execute("BEGIN")
                con.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", (key, value, time.time() + TTL))
                con.execute("COMMIT")

        lite.samples.append(await timed(n, lite_loop))

        async def lite_get_loop() -> None:
            for key in keys:
                con.execute("SELECT v FROM kv WHERE k = ? AND exp > ?", (key, time.time())).fetchone()

        lite_get.samples.append(await timed(n, lite_get_loop))
        con.close()

        table: dict[str, tuple[bytes, float | None]] = dict.fromkeys(keys, (value, time.time() + TTL))
        clock = time.time

        async def lookup(key: str) -> bytes | None:
            entry = table.get(key)
            if entry is not None and (entry[1] is None or entry[1] > clock()):
                return entry[0]
            return None

        async def dict_loop() -> None:
            for key in keys:
                await lookup(key)

        dict_get.samples.append(await timed(n, dict_loop))

    print(f"\nset: {n:,} keys of {len(keys[0])} chars, {VALUE_SIZE}-byte values with a TTL; {rounds} rounds")
    for s in (floor, raw, db_set, db_set_never, db_update, lite):
        print(s.line(None if s is floor else floor))
    print(f"  DB.set(everysec) / floor: {db_set.median / floor.median:.2f}× (target at most 1.25×)")
    print(f"  DB.update(everysec) / floor: {db_update.median / floor.median:.2f}× "
          f"(DB.set: {db_set.median / floor.median:.2f}×)")
    print(f"  sqlite3 / DB.set(everysec): {lite.median / db_set.median:.1f}×")
    print(f"\nget: {n:,} hits; {rounds} rounds")
    for s in (dict_get, db_get, lite_get):
        print(s.line(None if s is dict_get else dict_get))
    print(f"  DB.get / floor: {db_get.median / dict_get.median:.2f}× (target at most 1.5×)")
    return {"set": [floor, raw, db_set, db_set_never, lite], "get": [dict_get, db_get, lite_get],
            "update": [floor, db_update]}


# -- group commit -----------------------------------------------------------------------------------------


async def bench_group_commit(workdir: str, writers: int, per_writer: int, rounds: int) -> list[Series]:
    value = os.urandom(VALUE_SIZE)
    total = writers * per_writer
    record = fmt.encode_record(fmt.SET, session_keys(1)[0].encode(), value, time.time() + TTL)
    one_by_one = Series("os.write + os.fsync per record (floor)")
    grouped = Series(f'DB.set, sync="always", {writers} concurrent writers')
    fsyncs: list[int] = []
    for r in range(rounds):
        fd = os.open(f"{workdir}/fsync-{r}", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)

        async def fsync_loop() -> None:
            for _ in range(total):
                os.write(fd, record)
                os.fsync(fd)

        one_by_one.samples.append(await timed(total, fsync_loop))
        os.close(fd)

        async with DB(f"{workdir}/always-{r}", sync="always") as db:

            async def writer(w: int, db: DB = db) -> None:
                for i in range(per_writer):
                    await db.set(f"session:{w}:{i}", value, ttl=TTL)

            async def all_writers() -> None:
                async with anyio.create_task_group() as tg:
                    for w in range(writers):
                        tg.start_soon(writer, w)

            grouped.samples.append(await timed(total, all_writers))
            fsyncs.append(db.stats().fsyncs)
    print(f"\ngroup commit: {total:,} writes per round; {rounds} rounds")
    print(one_by_one.line(None))
    print(grouped.line(one_by_one))
    print(f"  throughput gain: {one_by_one.median / grouped.median:.1f}×; "
          f"writes per fsync: {total / statistics.median(fsyncs):.1f}")
    return [one_by_one, grouped]


# -- the everysec gap under sustained writes --------------------------------------------------------------


async def bench_everysec_gap(workdir: str, seconds: float, writers: int = 16) -> float:
    """The longest gap between two background fsyncs while `writers` tasks write flat out (each yielding to
    the loop after every write, as request handlers do)."""
    value = os.urandom(VALUE_SIZE)
    db = DB(f"{workdir}/gap.db", autoshrink=False)
    db._record_sync_times = True
    writes = 0
    async with db:
        deadline = time.monotonic() + seconds

        async def writer(w: int) -> None:
            nonlocal writes
            i = 0
            while time.monotonic() < deadline:
                await db.set(f"session:{w}:{i % 1000}", value, ttl=TTL)
                writes += 1
                i += 1
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for w in range(writers):
                tg.start_soon(writer, w)
        times = db._sync_gaps
    gaps = [b - a for a, b in itertools.pairwise(times)]
    worst = max(gaps) if gaps else float("inf")
    print(f"\neverysec under sustained writes: {writes / seconds:,.0f} writes/s from {writers} tasks for "
          f"{seconds:.0f} s; {len(times)} fsyncs")
    print(f"  gap between fsyncs: median {statistics.median(gaps):.3f} s, worst {worst:.3f} s "
          f"(target at most 1.2 s)")
    return worst


# -- cold open --------------------------------------------------------------------------------------------


async def bench_cold_open(workdir: str, n: int, rounds: int) -> None:
    path = f"{workdir}/cold.db"
    value = os.urandom(VALUE_SIZE)
    async with DB(path, sync="never", autoshrink=False) as db:
        for key in session_keys(n):
            await db.set(key, value, ttl=TTL * 24)
    size = os.path.getsize(path)
    times = []
    for _ in range(rounds):
        subprocess.run(["sync"], check=False)
        db = DB(path, autoshrink=False)
        started = time.perf_counter()
        await db.open()
        times.append(time.perf_counter() - started)
        assert len(db) == n
        await db.close()
    print(f"\ncold open: {n:,} live keys, {size / 1e6:.0f} MB file (page cache warm); {rounds} rounds")
    print(f"  open: median {statistics.median(times):.2f} s [{min(times):.2f}-{max(times):.2f}], "
          f"{statistics.median(times) / n * 1e6:.2f} µs per key")
    redis_times = redis_aof_load(workdir, n, rounds)
    if redis_times:
        ratio = statistics.median(times) / statistics.median(redis_times)
        print(f"  redis-server loading its AOF of the same keys: median {statistics.median(redis_times):.2f} s "
              f"[{min(redis_times):.2f}-{max(redis_times):.2f}]; DB.open / Redis: {ratio:.2f}× (target at most 4×)")


def redis_aof_load(workdir: str, n: int, rounds: int) -> list[float]:
    """Seconds redis-server takes to load its append-only file of `n` keys like the DB's (`DEBUG LOADAOF`
    empties the dataset and replays the AOF), or [] without redis-server."""
    import shutil
    import socket

    if shutil.which("redis-server") is None:
        print("  (redis-server is not installed: no Redis comparison)")
        return []
    import redis

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
         "--appendfsync", "no", "--dir", os.path.abspath(workdir), "--enable-debug-command", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, socket_timeout=600)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        value = os.urandom(VALUE_SIZE)
        keys = session_keys(n)
        for start in range(0, n, 10_000):
            pipe = client.pipeline(transaction=False)
            for key in keys[start : start + 10_000]:
                pipe.set(key, value, ex=int(TTL * 24))
            pipe.execute()
        client.bgrewriteaof()  # as the DB's file would be after a shrink: one record per key
        while client.info("persistence")["aof_rewrite_in_progress"]:
            time.sleep(0.05)
        times = []
        for _ in range(rounds):
            subprocess.run(["sync"], check=False)
            started = time.perf_counter()
            client.execute_command("DEBUG", "LOADAOF")
            times.append(time.perf_counter() - started)
            assert client.dbsize() == n
        return times
    finally:
        server.terminate()
        server.wait(timeout=30)


# -- memory -----------------------------------------------------------------------------------------------

_RSS_CHILD = """
import anyio, os, sys, gc
from buntsession import DB

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

n = int(sys.argv[1])
keys = [f"session:{i:064x}" for i in range(n)]  # the caller owns the keys either way

async def main():
    async with DB(":memory:") as db:
        gc.collect()
        before = rss()
        for key in keys:
            await db.set(key, os.urandom(200), ttl=3600)
        gc.collect()
        print(rss() - before, len(keys[0]))

anyio.run(main)
"""


def bench_memory(n: int) -> None:
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(n)], capture_output=True, text=True, check=True)
    grown, key_len = map(int, out.stdout.split())
    # The keys are allocated before the baseline (a caller holds them anyway), so count them here.
    payload = key_len + VALUE_SIZE
    per_session = grown / n + sys.getsizeof("x" * key_len)
    print(f"\nmemory: {n:,} sessions (key {key_len} chars + {VALUE_SIZE}-byte value = {payload} bytes)")
    print(f"  RSS per session: {per_session:.0f} bytes = {per_session / payload:.2f}× key + value")


# -- responsiveness ---------------------------------------------------------------------------------------


async def bench_stalls(workdir: str, n: int) -> None:
    """The longest the event loop waited while a shrink and a mass expiry ran in the background."""

    async def worst_wait_during(work: Callable[[], Awaitable[None]], period: float) -> float:
        worst = 0.0
        done = anyio.Event()

        async def probe() -> None:
            nonlocal worst
            while not done.is_set():
                started = time.perf_counter()
                await anyio.sleep(period)
                worst = max(worst, time.perf_counter() - started - period)

        async with anyio.create_task_group() as tg:
            tg.start_soon(probe)
            await anyio.sleep(period * 3)
            await work()
            done.set()
        return worst

    value = os.urandom(VALUE_SIZE)
    async with DB(f"{workdir}/stall.db", sync="never", autoshrink=False) as db:
        for key in session_keys(n):
            await db.set(key, value, ttl=TTL)
        shrink_stall = await worst_wait_during(db.shrink, 0.001)

    clock_offset = 0.0
    db = DB(f"{workdir}/expiry.db", sync="never", autoshrink=False, cleanup_interval=0.05)
    db._clock = lambda: time.time() + clock_offset
    async with db:
        for i, key in enumerate(session_keys(n)):
            await db.set(key, value, ttl=60 + (i % 1000) / 1000)  # all within one second

        async def expire_all() -> None:
            nonlocal clock_offset
            clock_offset = 62.0
            while db._data:
                await anyio.sleep(0.01)

        expiry_stall = await worst_wait_during(expire_all, 0.01)
        hold = db._cleanup_max_hold
    print(f"\nevent loop stalls with {n:,} keys (probe: how late a sleep wakes)")
    print(f"  during a shrink:                     {shrink_stall * 1000:.2f} ms worst")
    print(f"  during a mass expiry (10 ms probe):  {expiry_stall * 1000:.2f} ms worst; "
          f"longest cleanup batch holding the lock {hold * 1000:.2f} ms")


async def main(quick: bool) -> None:
    print(f"buntsession engine benchmark: Python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} cores, sqlite {sqlite3.sqlite_version}")
    with tempfile.TemporaryDirectory(dir=".", prefix=".bench-") as workdir:
        await bench_set_get(workdir, 5_000 if quick else 50_000, 3 if quick else 7)
        await bench_group_commit(workdir, 64, 5 if quick else 20, 3 if quick else 5)
        await bench_everysec_gap(workdir, 3 if quick else 10)
        await bench_stalls(workdir, 20_000 if quick else 200_000)
        await bench_cold_open(workdir, 20_000 if quick else 100_000, 2 if quick else 5)
    bench_memory(10_000 if quick else 100_000)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    anyio.run(main, parser.parse_args().quick)
