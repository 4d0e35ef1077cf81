"""`DB(path, shared=True)`: several processes on one host use one data file (worker processes of one app).

Each process keeps the whole live set in memory, as a single owner does. They take turns to append:
a write takes the sharers' append lock (a lock file beside the data file, held only for the append),
first catches up on the records the others appended, then appends its own. A read first checks, with
one stat, whether the file grew or was replaced, and if so catches up (or reloads the rewritten file)
in a worker thread. A rewrite is done by whichever process decides to, under the append lock; the
others notice the new file and reload it. Every sharer must open the file with the same options.

The synchronous `len(db)` and `db.stats()` show what this process has read so far: the next async call
catches up.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from typing import Any

import anyio

from buntsession.engine import format as fmt
from buntsession.engine.db import DB, Entry, _replayer
from buntsession.engine.log import Superseded

__all__ = ["SharedDB"]


class SharedDB(DB):
    """A DB opened with shared=True. Behaves as a DB; see the module docstring for what differs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The append lock is a flock, which belongs to this process's descriptor: tasks and threads of
        # this process take turns on this lock first.
        self._turn = threading.Lock()

    def _shared_options(self) -> str:
        return json.dumps({"format": fmt.VERSION, "sync": self.sync_policy, "autoshrink": self.autoshrink,
                           "autoshrink_percentage": self.autoshrink_percentage,
                           "autoshrink_min_size": self.autoshrink_min_size,
                           "cleanup_interval": self.cleanup_interval}, sort_keys=True)

    # -- catching up with the other processes -------------------------------------------------------------

    async def _refresh(self) -> None:
        log = self._log
        if log is not None and log.behind():  # one stat on the event loop; the reading happens in a thread
            await anyio.to_thread.run_sync(self._refresh_blocking)

    def _refresh_blocking(self, holding_append_lock: bool = False) -> None:
        with self._lock:
            self._refresh_locked(allow_reload=True, holding_append_lock=holding_append_lock)

    def _refresh_locked(self, allow_reload: bool, holding_append_lock: bool) -> None:
        log = self._log
        if log is None:
            return
        if log.replaced():
            if not allow_reload:
                raise Superseded(log.path)
            replayed: dict[str, Entry] = {}
            log.reopen(_replayer(replayed), lambda: self._install_index(replayed), holding_append_lock)
        else:
            log.catch_up(self._apply_record, holding_append_lock)

    def _apply_record(self, rtype: int, key: str, value: bytes, expire_at: float | None) -> None:
        """Apply another process's record to the index, as the write that made it did."""
        if rtype == fmt.SET:
            self._put(key, (value, expire_at))
        elif rtype == fmt.DEL:
            self._data.pop(key, None)
        elif (entry := self._data.get(key)) is not None:
            self._put(key, (entry[0], expire_at))

    @asynccontextmanager
    async def _appending(self) -> AsyncIterator[None]:
        """Hold the sharers' append lock, caught up with what the others wrote. Waiting for the lock
        sleeps on the event loop rather than blocking it."""
        log = self._writable()
        assert log is not None
        delay = 0.0001
        while True:
            if self._turn.acquire(False):
                if log.try_append_lock():
                    break
                self._turn.release()
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.005)
        try:
            if log.behind():
                await anyio.to_thread.run_sync(self._refresh_blocking, True)
            yield
        finally:
            log.append_unlock()
            self._turn.release()

    def _exclusive(self, final: bool) -> AbstractContextManager[object]:
        return self._locked_for_rewrite(final)

    @contextmanager
    def _locked_for_rewrite(self, final: bool) -> Iterator[None]:
        """The append lock, then the index lock, caught up. At the swap, a file another sharer replaced
        meanwhile ends this rewrite (Superseded) instead of being reloaded under it."""
        log = self._writable()  # raises when closed
        assert log is not None
        with self._turn:
            log.append_lock()
            try:
                with self._lock:
                    self._refresh_locked(allow_reload=not final, holding_append_lock=True)
                    yield
            finally:
                log.append_unlock()

    # -- the calls: reads catch up first, writes append under the lock -------------------------------------

    async def get(self, key: str) -> bytes | None:
        await self._refresh()
        return await super().get(key)

    async def get_with_expiry(self, key: str) -> tuple[bytes, float | None] | None:
        await self._refresh()
        return await super().get_with_expiry(key)

    async def ttl(self, key: str) -> float | None:
        await self._refresh()
        return await super().ttl(key)

    async def scan(self, prefix: str = "") -> AsyncIterator[str]:
        await self._refresh()
        async for key in super().scan(prefix):
            yield key

    async def set(self, key: str, value: bytes | bytearray | memoryview, ttl: float | None = None, *,
                  expire_at: float | None = None) -> None:
        async with self._appending():
            await super().set(key, value, ttl, expire_at=expire_at)

    async def expire(self, key: str, ttl: float | None, *, expire_at: float | None = None) -> bool:
        async with self._appending():
            return await super().expire(key, ttl, expire_at=expire_at)

    async def delete(self, key: str) -> bool:
        async with self._appending():
            return await super().delete(key)

    async def update(self, key: str, change: Callable[[bytes | None], tuple[bytes, float | None] | None]) -> bool:
        async with self._appending():
            return await super().update(key, change)
