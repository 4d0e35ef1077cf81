"""`DB(path, shared=True)`: several processes on one host use one data file (worker processes of one app).

Each process keeps the whole live set in memory, as a single owner does. They take turns to append:
a write takes the sharers' append lock (a lock file beside the data file, held only for the append),
first catches up on the records the others appended, then appends its own. A read first checks, with
one stat of the path (`AppendLog.look`), whether the file grew or was replaced, and if so catches up (or reloads the
rewritten file).
A rewrite is done by whichever process decides to, under the append lock; the others notice the new file
and reload it. Every sharer must open the file with the same options.

Catching up on a few records (the common case: the other worker wrote a session or two) reads them with
one `pread` on the event loop, as cheap as the append itself, inside the write's synchronous step: no thread
hop, so writes from several processes scale. A larger backlog is read in a worker thread, and a replaced
file is loaded in one, before the write takes its step.

A write that finds the append lock held retries it on the loop for a few tens of microseconds (the holder
keeps it for one write step), then lets the loop's other tasks run, then sleeps a little longer each time:
each write keeps its own count, so one busy moment never makes every other write of the process sleep.

The synchronous `len(db)` and `db.stats()` show what this process has read so far: the next async call
catches up.

`SharedLink` is composed into a `DB` (its `_link`); it imports nothing from `db.py`.
"""

from __future__ import annotations

import json
import time
from functools import partial
from typing import TYPE_CHECKING, Final

import anyio
import anyio.lowlevel

from buntsession.engine import format as fmt
from buntsession.engine.index import Entry, Index, apply_record
from buntsession.engine.log import Rewrite, Superseded

if TYPE_CHECKING:
    from buntsession.engine.db import DB

__all__ = ["SharedLink"]

_perf_counter = time.perf_counter

_ON_LOOP_LIMIT: Final = 256 * 1024
"""New bytes read on the event loop at most; a larger backlog is read in a worker thread."""
_SPIN: Final = 0.00003
"""Seconds a write retries the append lock on the event loop before it lets other tasks run: another
process holds it for one write step, a few microseconds, unless the scheduler took its CPU away."""
_YIELDS: Final = 3
"""Times a write lets the loop's other tasks run between such retries before it sleeps between them."""
_BACKOFF_FIRST: Final = 0.0001
_BACKOFF_MAX: Final = 0.005


class SharedLink:
    """What a DB opened with shared=True does besides what every DB does (see the module docstring)."""

    def __init__(self, db: DB) -> None:
        self._db = db
        self._needs_reload = False
        self._needs_backlog = False
        self._torn_at: int | None = None
        self.pending = False
        """Whether the last attempt to append found something `ready_to_append` must do first."""
        self._reloading: anyio.Event | None = None

    def options(self) -> str:
        """What every process sharing the file must agree on."""
        db = self._db
        return json.dumps({"format": fmt.VERSION, "sync": db.sync_policy, "autoshrink": db.autoshrink,
                           "autoshrink_percentage": db.autoshrink_percentage,
                           "autoshrink_min_size": db.autoshrink_min_size,
                           "cleanup_interval": db.cleanup_interval}, sort_keys=True)

    # -- reads ------------------------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Catch up with the file before a read: one stat when nothing changed."""
        db = self._db
        # A rewrite of ours swapping files first: its end already counts the others' records it took in,
        # which reach the index only when the swap is done, so `look()` cannot be trusted until then.
        if db._gate is not None:
            await db._wait_gate()
        log = db._log
        if log is None:
            return
        while (new := log.look()) is None:
            # The reload (ours, or one this waited for) read the new file as it was then: records appended
            # to it since, perhaps acknowledged before this read began, are caught up below.
            await self._reload()
            if db._log is not log:
                return
        if new <= 0:
            return
        if new > _ON_LOOP_LIMIT:
            await self._read_backlog()
            return
        db._take_guard()
        try:
            # Another task may have caught up meanwhile (the reload's await): `apply_new` then skips these.
            log.apply_appended(new, db._index.apply, False)
        finally:
            db._guard.release()

    # -- writes -----------------------------------------------------------------------------------------------

    async def wait_turn(self, attempt: int) -> None:
        """Let the loop's other tasks run (the first few times), or sleep a little longer each time, before
        attempt number `attempt` (1, 2...) at the append lock that another process held."""
        if attempt <= _YIELDS:
            await anyio.lowlevel.checkpoint()
        else:
            await anyio.sleep(min(_BACKOFF_FIRST * 2 ** (attempt - _YIELDS - 1), _BACKOFF_MAX))

    async def ready_to_append(self) -> bool:
        """Do, off the write's synchronous step, what the last attempt found it must do first. Returns True
        when the write may take its step now; False to start over."""
        self.pending = False
        db = self._db
        log = db._log
        if log is None:
            return True
        if self._needs_reload:
            self._needs_reload = False
            await self._reload()
            return False
        if self._needs_backlog:
            self._needs_backlog = False
            await self._read_backlog()
            return False
        if (size := self._torn_at) is not None:
            self._torn_at = None
            await anyio.to_thread.run_sync(self._cut_dead_tail, size)
            return False
        return True

    def lock_and_catch_up(self) -> bool | None:
        """In the write's synchronous step (the DB's guard held): take the sharers' append lock and apply
        what the others appended since (one stat, and one pread when they did). True: locked and caught up.
        False, holding nothing, when the write must start over (after `ready_to_append`); None, holding
        nothing, when another process kept the append lock (the write starts over after `wait_turn`)."""
        db = self._db
        log = db._log
        assert log is not None
        if not log.try_append_lock():
            # The holder is in a write step of a few microseconds: retry for about as long, on the loop.
            deadline = _perf_counter() + _SPIN
            while not log.try_append_lock():
                if _perf_counter() >= deadline:
                    return None
        self.pending = True
        try:
            new = log.look()
            if new is None:
                self._needs_reload = True
            elif new <= 0:
                self.pending = False
                return True
            elif new > _ON_LOOP_LIMIT:
                self._needs_backlog = True
            else:
                found = log.apply_appended(new, db._index.apply, True)
                if found is None:
                    self.pending = False
                    return True
                self._torn_at = found
        except BaseException:
            log.append_unlock()
            raise
        log.append_unlock()
        return False

    def unlock(self) -> None:
        log = self._db._log
        if log is not None:
            log.append_unlock()

    # -- rewrites ---------------------------------------------------------------------------------------------

    def finish_rewrite(self, rw: Rewrite) -> tuple[int, bytes]:
        """The final phase of a rewrite, in a worker thread: under the append lock, take in the records
        the others appended (they go into the new file too), then swap. Returns the new size and those
        records, for `apply_copied` on the event loop."""
        log = self._db._log
        assert log is not None
        log.append_lock()
        try:
            # Give up before taking in the others' records: they move our end, and only a finished rewrite
            # hands them to the index (a read may have moved the log to a sharer's newer file meanwhile).
            if log.replaced() or log.generation != rw.generation:
                raise Superseded(log.path)
            others = log.complete_new()
            return log.rewrite_finish(rw, log.end + len(others)), others
        finally:
            log.append_unlock()

    def apply_copied(self, records: bytes) -> None:
        if records:
            with memoryview(records) as view:
                fmt.replay(view, 0, self._db._index.apply, self._db._salt)  # the same file's records

    # -- internals --------------------------------------------------------------------------------------------

    async def _read_backlog(self) -> None:
        db = self._db
        log = db._log
        if log is None:
            return
        start, fresh = await anyio.to_thread.run_sync(log.read_new)
        if db._log is log:
            db._take_guard()
            try:
                log.apply_new(start, fresh, db._index.apply, False)
            finally:
                db._guard.release()

    async def _reload(self) -> None:
        """Move to the file another process's rewrite put at the path: load it in a worker thread, then
        install its index and switch to it in one step."""
        if (running := self._reloading) is not None:
            await running.wait()
            return
        db = self._db
        log = db._log
        if log is None:
            return
        done = self._reloading = anyio.Event()
        try:
            generation = log.generation
            replayed: dict[str, Entry] = {}
            new = await anyio.to_thread.run_sync(log.load_replacement, partial(apply_record, replayed))
            if db._log is not log or log.generation != generation:
                log.discard(new)  # closed, or moved on meanwhile
                return
            db._take_guard()
            try:
                db._index = Index(replayed, db._clock())
                log.switch(new)
                db._salt = log.salt  # a file recreated meanwhile has a salt of its own
            finally:
                db._guard.release()
        finally:
            self._reloading = None
            done.set()

    def _cut_dead_tail(self, size: int) -> None:
        """Cut the incomplete record a killed writer left, under the append lock. Blocking."""
        log = self._db._log
        if log is None:
            return
        log.append_lock()
        try:
            log.cut_tail(size)
        finally:
            log.append_unlock()
