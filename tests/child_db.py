"""A child process for crash and lock tests. It prints one line per acknowledged operation.

    python child_db.py PATH write SYNC            set/delete forever, printing "ACK n" after op n returns
    python child_db.py PATH shrinkwrite SYNC      the same while another task shrinks the file again and again
    python child_db.py PATH phase:NAME            fill, then shrink and stop after phase NAME, writing meanwhile
    python child_db.py PATH hold [LOCK_TIMEOUT]   open, print "OPEN", wait for stdin to close
    python child_db.py PATH try                   try to open: "OPEN", or "LOCKED <message>"
    python child_db.py PATH fsize                 hit RLIMIT_FSIZE in mid-record, then get the space back
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import time

import anyio

from buntsession import DB, FileLockedError, StoreError
from buntsession.engine.log import FileOps


def operation(n: int) -> tuple[str, str, bytes]:
    """The n-th operation of the deterministic workload: ("set", key, value) or ("del", key, b"")."""
    if n % 7 == 6:
        return "del", f"k{n - 3}", b""
    return "set", f"k{n}", f"value-{n}-".encode() * 8


def expected_state(count: int) -> dict[str, bytes]:
    state: dict[str, bytes] = {}
    for n in range(count):
        op, key, value = operation(n)
        if op == "set":
            state[key] = value
        else:
            state.pop(key, None)
    return state


async def run_workload(db: DB, start: int = 0) -> None:
    n = start
    while True:
        op, key, value = operation(n)
        if op == "set":
            await db.set(key, value, ttl=3600 if n % 2 else None)
        else:
            await db.delete(key)
        print(f"ACK {n}", flush=True)
        n += 1


class PhaseStop(FileOps):
    def __init__(self, stop_at: str) -> None:
        self.stop_at = stop_at

    def phase(self, name: str) -> None:
        if name == self.stop_at:
            print(f"PHASE {name}", flush=True)
            time.sleep(600)


async def main(path: str, mode: str, arg: str | None) -> None:
    if mode in ("write", "shrinkwrite"):
        options = {"sync": arg or "everysec", "autoshrink_min_size": 8192, "cleanup_interval": 0.05}
        async with DB(path, **options) as db, anyio.create_task_group() as tg:  # type: ignore[arg-type]
            if mode == "shrinkwrite":

                async def shrink_forever() -> None:
                    while True:
                        await db.shrink()
                        await anyio.sleep(0.01)

                tg.start_soon(shrink_forever)
            tg.start_soon(run_workload, db)
    elif mode.startswith("phase:"):
        db = DB(path, sync="always", autoshrink=False)
        db._fileops = PhaseStop(mode.split(":", 1)[1])
        async with db:
            for n in range(700):
                op, key, value = operation(n)
                await (db.set(key, value) if op == "set" else db.delete(key))
                print(f"ACK {n}", flush=True)
            print(f"SIZE {db.stats().file_size}", flush=True)
            async with anyio.create_task_group() as tg:
                tg.start_soon(db.shrink)
                await anyio.sleep(0.01)
                await run_workload(db, 700)
    elif mode == "hold":
        async with DB(path, lock_timeout=float(arg or 0)):
            print("OPEN", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)
    elif mode == "fsize":
        async with DB(path) as db:
            await db.set("before", b"x" * 100)
            size = os.path.getsize(path)
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a short write and EFBIG instead of death
            resource.setrlimit(resource.RLIMIT_FSIZE, (size + 60, hard))
            for attempt in range(2):
                try:
                    await db.set(f"big{attempt}", b"y" * 500)
                    print("ACCEPTED", flush=True)
                except StoreError as exc:
                    print(f"REFUSED {os.path.getsize(path) == size} {exc.__cause__!r}", flush=True)
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # the space comes back
            await db.set("after", b"z" * 100)
            print("RESUMED", flush=True)
    elif mode == "try":
        try:
            async with DB(path):
                print("OPEN", flush=True)
        except FileLockedError as exc:
            print(f"LOCKED {exc}", flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
