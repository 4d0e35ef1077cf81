"""Rewriting a DB's file to its live set: an explicit `shrink()`, autoshrink, and putting back the live set
of a data file deleted under a running DB.

The snapshot is taken on the event loop in bounded steps; every blocking part (the rewrite's writes, the
tail copy, fsync, rename and directory fsync) runs in a worker thread, in the phases of
`AppendLog.rewrite_begin`. Writes go on meanwhile; only the final phase (the last records copied, the
swap) holds the DB's writers at its gate and, in shared mode, the other processes at the append lock.

`Rewriter` is composed into a `DB` (its `_rewriter`), as `SharedLink` is; it imports nothing from `db.py`
at run time.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Final

import anyio
import anyio.lowlevel

from buntsession.engine import format as fmt
from buntsession.engine.host import Gate
from buntsession.engine.log import AppendLog, Rewrite, Superseded
from buntsession.errors import StoreError

if TYPE_CHECKING:
    from buntsession.engine.db import DB

__all__ = ["SNAPSHOT_CHUNK", "Rewriter"]

logger = logging.getLogger("buntsession")

SNAPSHOT_CHUNK: Final = 1000
"""Keys encoded per step of a rewrite's snapshot on the event loop (and looked at per step of a scan)."""
_SNAPSHOT_WRITE: Final = 1 << 20
"""Bytes of encoded snapshot handed to a worker thread at once."""
_RETRY_FIRST: Final = 60.0
_RETRY_MAX: Final = 3600.0

_monotonic = time.monotonic


class _Aborted(Exception):
    """A rewrite gave up because the DB is closing."""


class Rewriter:
    """A DB's rewrites: when one is due, running one, and what the last one left."""

    def __init__(self, db: DB) -> None:
        self._db = db
        self.running: Gate | None = None
        """The rewrite in progress (its gate opens when it ends)."""
        self.soon = False
        """An autoshrink task was started."""
        self.restore = False
        """The data file was deleted under us: the next rewrite puts the live set back at the path."""
        self.shrinks = 0
        self.base_size = 0
        """The file's size after the last rewrite (or the live data's at open): autoshrink measures from it."""
        self.retry_at = 0.0
        """Monotonic time before which autoshrink does not try again after a failure."""
        self.backoff = _RETRY_FIRST

    def reset(self, base_size: int) -> None:
        """At open: nothing rewritten yet, and the live data's size to measure growth from."""
        self.shrinks, self.restore, self.base_size = 0, False, base_size
        self.retry_at, self.backoff = 0.0, _RETRY_FIRST

    def check_unlinked(self) -> None:
        """Notice a data file deleted under us (one fstat): say it loudly and have the next rewrite put the
        live set back at the path. Shared mode cannot restore it (the others hold the deleted file)."""
        db = self._db
        log = db._log
        if log is None or self.restore or db._failed is not None:
            return
        try:
            gone = log.unlinked()
        except OSError:
            return
        if not gone:
            return
        if db._link is not None:
            logger.error("%s: the shared data file was deleted while in use; writes go to a deleted file", log.path)
            db._fail(OSError(f"{log.path} was deleted while in use"), "the data file")
            return
        logger.error("%s: the data file was deleted while the DB was open; writing the %d live keys back to it",
                     log.path, len(db._index.data))
        self.restore = True
        self.retry_at = 0.0

    def due(self) -> bool:
        """Whether an autoshrink (or the restoring of a deleted file) should start now."""
        db = self._db
        log = db._log
        if log is None or db._failed is not None or self.running is not None or self.soon:
            return False
        if self.restore:
            return True
        if not db.autoshrink:
            return False
        base = self.base_size
        return (
            log.end > db.autoshrink_min_size
            and log.end > base + base * db.autoshrink_percentage // 100
            and _monotonic() >= self.retry_at
        )

    async def wait(self) -> None:
        """Return when no rewrite is in progress."""
        while (running := self.running) is not None:
            await running.wait(lambda: self.running is running)

    async def run(self, explicit: bool) -> None:
        """Rewrite the file to the live set (see AppendLog.rewrite_begin for the phases). An explicit one
        waits for one in progress and raises StoreError when it fails; an automatic one gives way."""
        if self.running is not None:
            if not explicit:
                return
            await self.wait()
        db = self._db
        log = db._writable()
        if log is None:
            return
        if not explicit and db._closing and not self.restore:
            return
        running = self.running = Gate()
        try:
            await self._steps(log, explicit)
        finally:
            self.running = None
            running.event.set()

    async def _steps(self, log: AppendLog, explicit: bool) -> None:
        db = self._db
        restore = self.restore and db._link is None
        if not restore:
            self.check_unlinked()
            restore = self.restore and db._link is None
        link = db._link
        # The snapshot: the keys now, and the file's end now (no await in between). Each entry is read at
        # some later step; the tail copy then brings every record written since, so a key's last record
        # in the new file is its latest state either way.
        start, generation = log.end, log.generation
        keys = list(db._index.data)
        before = log.end
        started = time.perf_counter()
        rw: Rewrite | None = None
        try:
            rw = await anyio.to_thread.run_sync(log.rewrite_begin, start, restore, generation)
            buffer: list[bytes] = []
            pending = 0
            encode, salt = fmt.encode_record, log.salt
            for first in range(0, len(keys), SNAPSHOT_CHUNK):
                if db._closing and not restore:
                    raise _Aborted
                data, now = db._index.data, db._clock()
                for key in keys[first : first + SNAPSHOT_CHUNK]:
                    entry = data.get(key)
                    if entry is not None and (entry[1] is None or entry[1] > now):
                        record = encode(fmt.SET, key.encode(), entry[0], entry[1], salt)
                        buffer.append(record)
                        pending += len(record)
                if pending >= _SNAPSHOT_WRITE:
                    await anyio.to_thread.run_sync(log.rewrite_write, rw, b"".join(buffer))
                    buffer, pending = [], 0
                else:
                    await anyio.lowlevel.checkpoint()
            if buffer:
                await anyio.to_thread.run_sync(log.rewrite_write, rw, b"".join(buffer))
            await anyio.to_thread.run_sync(log.rewrite_tail, rw)
            if db._closing and not restore:
                raise _Aborted
            # The final phase: this DB's writers wait at the gate (and, shared, the others at the append lock).
            # Closed under the guard, so that no other thread's write step is in progress past it.
            db._take_guard()
            try:
                gate = db._gate = Gate()
                db._due = -math.inf
            finally:
                db._guard.release()
            try:
                with anyio.CancelScope(shield=True):
                    if link is not None:
                        size, others = await anyio.to_thread.run_sync(link.finish_rewrite, rw)
                        link.apply_copied(others)
                    else:
                        size = await anyio.to_thread.run_sync(log.rewrite_finish, rw)
            finally:
                db._gate = None
                db._schedule()
                gate.event.set()
        except (_Aborted, Superseded):
            if rw is not None:
                await anyio.to_thread.run_sync(log.rewrite_abort, rw)
            return  # closing, or another sharer rewrote the file first (the next call reloads it)
        except OSError as exc:
            if rw is not None:
                await anyio.to_thread.run_sync(log.rewrite_abort, rw)
            if log.failed is not None:
                db._fail(exc, "directory fsync after a rewrite")
            self.retry_at = _monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, _RETRY_MAX)
            logger.error("rewrite of %s failed: %s; the old file is kept", db._abspath, exc)
            if explicit:
                raise StoreError(f"{db._abspath}: rewrite failed: {exc}") from exc
            return
        except BaseException:
            if rw is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(log.rewrite_abort, rw)
            raise
        if restore:
            self.restore = False
            logger.warning("%s: the live set is back on disk (%d bytes)", db._abspath, size)
        self.shrinks += 1
        self.base_size = size
        self.backoff = _RETRY_FIRST
        logger.info("shrank %s from %d to %d bytes in %.3f s", db._abspath, before, size,
                    time.perf_counter() - started)
