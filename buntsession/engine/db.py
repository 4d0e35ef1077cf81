"""`DB`: the in-memory index over the append-only file, expiry, and the background work as anyio tasks.

The units it is made of: `index` (the keys, their expiry heap, what a record does to them), `log` (the
data file: lock, load, append, fsync, the phases of a rewrite), `rewrite` (rewriting the file to the live
set: shrink, autoshrink, restoring a deleted file), `shared` (shared mode's catching up with the other
processes), `host` (the gates that hold writers, the task that hosts the background work), `args` (the
argument checks) and `format` (the bytes of a file). This module holds the DB's state and its calls.

Who runs what
-------------

- The index (`Index`: a dict and an expiry heap) is touched only by code running on an event loop, in
  synchronous steps: a write appends its record with one `write` call and updates the index with no
  `await` in between, so the file's order is the index's order and `update` is atomic without a lock.
- Every blocking file call but that one append runs in an anyio worker thread: open and load, fsync,
  truncation, the rewrite's writes, rename and directory fsync.
- The periodic work (the "everysec" fsync, dropping expired keys from memory in bounded batches, autoshrink)
  runs as anyio tasks in the DB's own task group. The package starts no thread of its own.

Who owns the background tasks
-----------------------------

`open()` cannot know whether the matching `close()` will come from the same task (an `async with DB(...)`,
the middleware's lifespan) or never (served without lifespan, where the first request opens the DB and
each request may run on a new event loop). Entering a task group in the caller's task would break the
second case: that task would end, or leave cancel scopes, with the group still open. So the first `open()`
starts one detached task on its event loop (an asyncio task, or a trio system task), and that task hosts the
DB's own anyio task group. `close()` cancels the group and waits for it; when the event loop ends first (a
request's loop under Starlette's `TestClient`, or an `anyio.run` that opened the DB and returned), the loop
cancels the host task, and the DB goes on without one.

Without a live host (or with a host that the loop has no time to run, such as under a write loop that never
yields) the same work is done as calls arrive: a write that finds the periodic work overdue does a bounded
step of it first (one fsync, one batch of expired keys, or an autoshrink that is due), so every acknowledged
write reaches the OS and the file is fsynced about once a second as long as writes come.

Threads
-------

A DB keeps no state tied to one event loop, so one DB may be used under asyncio and trio, one loop after
another. Two threads at once (two event loops using one DB concurrently) also work: the synchronous write
steps take a lock that is never held across an `await` (so waiting for it is bounded by one step), a group
commit waits only for an fsync led from its own thread, and a thread that finds another thread's rewrite
in its final phase polls until it is done.

The fast path
-------------

`set` and `update` take their step without that lock, as long as they run in the thread that opened the DB
(the "solo" thread: an app's one event loop) and nothing sends them the general way (`_due`: periodic work
due, a closed gate, shared mode, `sync="always"`, a closed or failed DB). A second thread that takes the
lock ends the solo thread's lock-free steps for good, waiting for one in progress (`_take_guard`). The
fast path does what `_write` does with the lock held, inlined: the same checks, one write call, the same
index update.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Final, Literal, NoReturn, get_args

import anyio
import anyio.abc
import anyio.lowlevel

from buntsession.engine import format as fmt
from buntsession.engine.args import check_key, key_bytes, require_int, seconds, unix_time, value_bytes
from buntsession.engine.host import Gate, Host, running_loop
from buntsession.engine.index import Entry, Index, apply_record, live_size
from buntsession.engine.log import AppendFailed, AppendLog, FileOps
from buntsession.engine.rewrite import SNAPSHOT_CHUNK, Rewriter
from buntsession.engine.shared import SharedLink
from buntsession.errors import FileLockedError, StoreError

__all__ = ["DB", "Stats", "SyncPolicy"]

logger = logging.getLogger("buntsession")

SyncPolicy = Literal["everysec", "always", "never"]
MEMORY: Final = ":memory:"

_CLEANUP_BATCH: Final = 500
"""Expired keys dropped per step on the event loop: well under a millisecond."""
_FAST_TTL_LIMIT: Final = float(1 << 52)  # below it an int ttl converts to float exactly and the sum stays finite
# (a float: comparing a float with an int this large takes CPython's slow path)
_MAX_VALUE: Final = fmt.MAX_VALUE_SIZE
_MAX_KEY: Final = fmt.MAX_KEY_SIZE
_INF: Final = math.inf
_SYNC_INTERVAL: Final = 1.0
_HOST_SLACK: Final = 0.1
"""How late the host task may be with its periodic work before a call does it instead."""

_monotonic = time.monotonic
_heappush = heapq.heappush
_get_ident = threading.get_ident
_encode = fmt.encode_record
_SET: Final = fmt.SET

# A child process forked after open shares the parent's file and lock; it must not use them. Its copies
# of the open DBs forget their keys, so every call (reads included) finds the fork and refuses.
_fork_generation = 0
_open_dbs: weakref.WeakSet[DB] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1
    for db in list(_open_dbs):
        db._index = Index()
        db._guard = threading.Lock()  # it may have been held by a thread that did not survive the fork
        db._solo, db._busy, db._due = 0, False, -math.inf


os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of a DB's counters."""

    keys: int
    """Live keys."""
    expired: int
    """Keys past their expiry that are still in memory (never returned; dropped by the next pass)."""
    file_size: int
    """Bytes in the data file (0 for `:memory:`)."""
    fsyncs: int
    """fsync calls on the data file since open."""
    shrinks: int
    """Rewrites of the data file since open."""


class DB:
    """An embedded key/value store kept in one append-only file. See the package README for the contract.

    Keys are non-empty `str`; values are bytes-like and come back as `bytes`. `ttl` is a positive, finite
    number of seconds, or None for no expiry. Every method raises `StoreError` on a closed DB, and
    `FileLockedError` in a process forked after the DB was opened.
    """

    # Slots: a DB has more attributes than CPython 3.11 keeps in an instance's shared-key values (30), and
    # attribute reads on the hot paths are faster from slots than from a dict. A `__dict__` too, so that
    # code (tests, most often) may still set attributes of its own on a DB or patch a method of one.
    __slots__ = ("__dict__", "__weakref__", "_abspath", "_always", "_busy", "_cleanup_batches", "_cleanup_due",
        "_cleanup_max_hold", "_clock", "_closing", "_due", "_failed", "_fileops", "_fork_gen", "_gate", "_guard",
        "_host", "_host_task", "_index", "_link", "_log", "_memory", "_open", "_record_sync_times", "_rewriter",
        "_salt", "_solo", "_sync_batch", "_sync_due", "_sync_gaps", "_syncing", "_transition", "_users", "_work_due",
        "autoshrink", "autoshrink_min_size", "autoshrink_percentage", "cleanup_interval", "lock_timeout", "path",
        "shared", "sync_policy")

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sync: SyncPolicy = "everysec",
        autoshrink: bool = True,
        autoshrink_percentage: int = 100,
        autoshrink_min_size: int = 32 * 1024 * 1024,
        cleanup_interval: float = 1.0,
        lock_timeout: float = 0.0,
        shared: bool = False,
    ) -> None:
        if sync not in get_args(SyncPolicy):
            raise ValueError(f"sync must be one of {get_args(SyncPolicy)}, not {sync!r}")
        require_int("autoshrink_percentage", autoshrink_percentage)
        require_int("autoshrink_min_size", autoshrink_min_size)
        self.path = os.fspath(path)
        self.sync_policy: SyncPolicy = sync
        self._always = sync == "always"
        self.autoshrink = bool(autoshrink)
        self.autoshrink_percentage = autoshrink_percentage
        self.autoshrink_min_size = autoshrink_min_size
        self.cleanup_interval = seconds(cleanup_interval, "cleanup_interval")
        self.lock_timeout = 0.0 if lock_timeout == 0 else seconds(lock_timeout, "lock_timeout")
        self._memory = self.path == MEMORY
        self.shared = bool(shared)
        if self.shared and self._memory:
            raise ValueError("a :memory: DB cannot be shared")
        self._abspath = self.path if self._memory else os.path.abspath(self.path)

        # Seams for tests: every file operation, and the wall clock that expiry is measured against.
        self._fileops = FileOps()
        self._clock: Callable[[], float] = time.time

        self._users = 0
        self._fork_gen = _fork_generation
        self._open = False
        self._transition: Gate | None = None  # an open or a close in progress
        self._log: AppendLog | None = None
        self._link: SharedLink | None = None  # shared mode: catching up with the other processes
        self._salt = 0  # the file's salt: every record this DB frames starts its checksums from it
        self._index = Index()
        self._guard = threading.Lock()
        """Held by each synchronous write step of the general path, never across an await: only a second
        thread ever waits (see `_take_guard`)."""
        self._solo = 0
        """The thread whose fast-path steps skip the guard: the one that opened the DB, until another thread
        takes the guard (then 0: every thread takes it). See `_take_guard`."""
        self._busy = False
        """True while the solo thread is in a fast-path step (set before it checks that it is still solo)."""
        self._gate: Gate | None = None
        self._failed: BaseException | None = None
        self._host: Host | None = None
        self._sync_batch: tuple[int, anyio.Event] | None = None  # a group-commit fsync in flight: thread, event
        self._syncing = False  # a background fsync in flight
        self._rewriter = Rewriter(self)
        self._sync_due = self._cleanup_due = 0.0
        self._work_due = math.inf
        """Monotonic time from which a write does the overdue periodic work itself."""
        self._due = -math.inf
        """Monotonic time until which a write may take the fast path: `_work_due`, or -inf while only the
        general path may write (closed, failed, forked, a closed gate, shared mode, sync="always")."""
        self._closing = False
        self._cleanup_max_hold = 0.0  # longest cleanup step on the loop, for tests and benchmarks
        self._cleanup_batches = 0
        self._sync_gaps: list[float] = []  # monotonic times of the everysec fsyncs, for the benchmark
        self._record_sync_times = False

    @property
    def _data(self) -> dict[str, Entry]:
        """The index's dict (tests and benchmarks look at it)."""
        return self._index.data

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"DB({self.path!r}, sync={self.sync_policy!r}{', shared=True' if self.shared else ''}) [{state}]"

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Lock and load the file (the first call), or count one more user (later calls).

        The first call also starts the background tasks on this event loop (see the module docstring).
        Raises StoreError (the path cannot hold a data file, or an OS error), FileLockedError (another
        owner), CorruptFileError (damage before the tail; the file is left as it was).
        """
        await self._wait_transition()
        if self._users:
            self._check_process()
            self._users += 1
            return
        gate = self._transition = Gate()
        try:
            started = time.perf_counter()
            self._fork_gen = _fork_generation
            replayed: dict[str, Entry] = {}
            log = None
            if not self._memory:
                # The file a symlink names is the data file: it is what a rewrite replaces (the link stays)
                # and what is locked, whichever path names it. Resolved at each open: the link may move.
                self._abspath = await anyio.to_thread.run_sync(os.path.realpath, self.path)
                link = SharedLink(self) if self.shared else None
                log = await anyio.to_thread.run_sync(partial(
                    AppendLog.open, self._abspath, self._fileops, self.lock_timeout, partial(apply_record, replayed),
                    None if link is None else link.options()))
                self._link = link
            self._index = Index(replayed, self._clock())
            self._rewriter.reset(live_size(self._index.data))
            self._log = log
            self._salt = 0 if log is None else log.salt
            self._failed, self._closing = None, False
            self._open = True
            self._users = 1
            self._solo, self._busy = _get_ident(), False
            _open_dbs.add(self)
            now = _monotonic()
            self._sync_due = now + _SYNC_INTERVAL
            self._cleanup_due = now + self.cleanup_interval
            self._start_host()
            self._schedule()
            if log is not None:
                logger.info("opened %s%s: %d keys, %d bytes, in %.3f s", self._abspath,
                            " (shared)" if self.shared else "", len(self._index.data), log.end,
                            time.perf_counter() - started)
        finally:
            self._transition = None
            gate.event.set()

    async def close(self) -> None:
        """Count one user less; the last one stops the background tasks, fsyncs and releases the file.

        Closing a DB that is not open does nothing. A cancelled close still closes (it is shielded).
        Raises StoreError when the final fsync fails (writes since the last fsync may be lost).
        """
        with anyio.CancelScope(shield=True):
            await self._wait_transition()
            if not self._users:
                return
            if self._fork_gen != _fork_generation:
                # A forked child: forget its copy. The file and its lock are the parent's: touch neither.
                self._users, self._open, self._log, self._host = 0, False, None, None
                self._index = Index()
                return
            self._users -= 1
            if self._users:
                return
            gate = self._transition = Gate()
            try:
                await self._release()
            finally:
                self._transition = None
                gate.event.set()

    async def __aenter__(self) -> DB:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _wait_transition(self) -> None:
        while (gate := self._transition) is not None:
            await gate.wait(lambda: self._transition is gate)

    async def _release(self) -> None:
        self._end_solo()  # closed from another thread: no fast-path step may slip past what follows
        self._closing = True  # a rewrite in progress gives up at its next step
        await self._stop_host()
        await self._rewriter.wait()
        while (gate := self._gate) is not None:
            await gate.wait(lambda: self._gate is gate)
        log = self._log
        self._rewriter.check_unlinked()
        if log is not None and self._rewriter.restore and self._failed is None:
            await self._rewriter.run(explicit=False)  # the file was deleted under us: put it back before closing
        # First every write takes the general path (which raises: closed); then, under the guard, which
        # waits for a fast-path step of another thread in progress, the log and the index go.
        self._due = -math.inf
        self._take_guard()
        try:
            self._open = False
            self._log, self._link = None, None
            _open_dbs.discard(self)
            self._index = Index()
        finally:
            self._guard.release()
        if log is None:
            return
        error: OSError | None = None
        if self._failed is None:
            try:
                await anyio.to_thread.run_sync(log.sync_to, log.written)
            except OSError as exc:
                logger.error("fsync of %s at close failed: %s", log.path, exc)
                error = exc
        await anyio.to_thread.run_sync(log.close)
        if error is not None:
            raise StoreError(f"{self._abspath}: fsync at close failed; writes since the last fsync may be lost") \
                from error

    # -- the background host ---------------------------------------------------------------------------------

    def _start_host(self) -> None:
        """Start the detached task that hosts this DB's task group on the running event loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            host = Host(loop.call_soon_threadsafe)
            host.loop = loop
            task = loop.create_task(self._host_main(host), name=f"buntsession background {self.path}")
            self._host_task: object = task  # the loop keeps only a weak reference to its tasks
        else:
            import trio  # noqa: PLC0415  (only under trio, which is then installed)

            host = Host(trio.lowlevel.current_trio_token().run_sync_soon)
            trio.lowlevel.spawn_system_task(self._host_main, host, name=f"buntsession background {self.path}")
        self._host = host

    async def _stop_host(self) -> None:
        host, self._host = self._host, None
        if host is None:
            return
        host.stop()
        if host.done is not None and _get_ident() == host.thread:
            await host.done.wait()

    async def _host_main(self, host: Host) -> None:
        if host.stopped:
            return  # closed before this task first ran
        host.done = anyio.Event()
        try:
            # A loop that is ending cancels the host at once: start no task then (under trio, a task started
            # in a nursery that is being cancelled would never run its coroutine).
            await anyio.lowlevel.checkpoint()
            if host.stopped:
                return
            async with anyio.create_task_group() as tg:
                host.scope = tg.cancel_scope  # no await since the check above: stop() cancels it from now on
                host.tg = tg
                await self._background(tg)
        finally:
            if self._host is host:
                self._host = None  # the loop is ending: calls do the work from now on
                self._schedule()
            host.done.set()

    async def _background(self, tg: anyio.abc.TaskGroup) -> None:
        """The host's loop: the everysec fsync once a second (timed from the start of the last one, so the
        gap stays a second), expiry cleanup and the check for a deleted file every `cleanup_interval` (at
        most a second), and an autoshrink, when due, as a task of its own so the fsyncs go on meanwhile.

        The host runs this in its own body rather than in child tasks: a child that its loop never started
        (a loop stopped for good, as anyio's pytest runner does between tests) would hang the loop's final
        cancellation of its tasks."""
        everysec = self.sync_policy == "everysec"
        while True:
            wake = min(self._cleanup_due, self._sync_due) if everysec else self._cleanup_due
            await anyio.sleep(max(0.0, wake - _monotonic()))
            try:
                now = _monotonic()
                if everysec and now >= self._sync_due:
                    await self._everysec_sync()
                if now >= self._cleanup_due:
                    self._cleanup_due = now + min(self.cleanup_interval, _SYNC_INTERVAL)
                    self._schedule()
                    await self._drop_expired()
                    self._rewriter.check_unlinked()
                    if self._rewriter.due():
                        self._rewriter.soon = True
                        tg.start_soon(self._autoshrink)
            except Exception:
                logger.exception("background work on %s failed", self._abspath)

    async def _autoshrink(self) -> None:
        try:
            await self._rewriter.run(explicit=False)
        except StoreError:
            pass  # closed or failed meanwhile: the next call says so
        except Exception:
            logger.exception("autoshrink of %s failed", self._abspath)
        finally:
            self._rewriter.soon = False

    def _schedule(self) -> None:
        """When a write must do the periodic work itself (when it is due, or a little later while a host
        task is alive to do it), and whether writes may take the fast path until then."""
        due = self._cleanup_due
        if self.sync_policy == "everysec":
            due = min(due, self._sync_due)
        self._work_due = due + (_HOST_SLACK if self._host is not None else 0.0)
        if (self._gate is not None or self._link is not None or self._always or not self._open
                or self._failed is not None or self._fork_gen != _fork_generation):
            # Every write takes the general path: it waits at the gate, catches up with the other
            # processes, leads a group commit, or raises why this DB takes no writes.
            self._due = -math.inf
        else:
            self._due = self._work_due

    async def _work_as_calls_arrive(self) -> None:
        """A bounded step of overdue periodic work, done by a write (no host, or a starved one)."""
        now = _monotonic()
        if self.sync_policy == "everysec" and now >= self._sync_due:
            host = self._host
            if host is not None and host.tg is not None and not host.stopped and host.loop is running_loop():
                # A host that is alive but has not had the loop (writes that never yield): hand it the fsync
                # as a task, so this write does not wait for it; it runs as soon as the loop is free.
                self._sync_due = now + _SYNC_INTERVAL
                host.tg.start_soon(self._everysec_sync)
            else:
                await self._everysec_sync()
        if now >= self._cleanup_due:
            self._cleanup_due = now + min(self.cleanup_interval, _SYNC_INTERVAL)
            self._drop_expired_step()
            self._rewriter.check_unlinked()
            if self._host is None and self._rewriter.due():
                await self._rewriter.run(explicit=False)
        self._schedule()

    async def _everysec_sync(self) -> None:
        started = _monotonic()
        self._sync_due = started + _SYNC_INTERVAL
        self._schedule()
        log = self._log
        if log is None or self._failed is not None or self._syncing or log.synced >= log.written:
            return
        self._syncing = True
        try:
            await anyio.to_thread.run_sync(log.sync_to, log.written)
            if self._record_sync_times:
                self._sync_gaps.append(_monotonic())
        except OSError as exc:
            if self._open and self._log is log:
                self._fail(exc, "background fsync")
        finally:
            self._syncing = False

    # -- reads -----------------------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        """The value of `key`, or None when it is absent or expired."""
        if self._link is not None:
            await self._link.refresh()
        # A closed DB, and a forked child's copy, hold no keys: a hit needs no further checks.
        entry = self._index.data.get(key)
        if entry is not None:
            exp = entry[1]
            if exp is None or exp > self._clock():
                return entry[0]
            self._forget(key, entry)
            return None
        self._check_read(key)
        return None

    async def get_with_expiry(self, key: str) -> tuple[bytes, float | None] | None:
        """The value of `key` and its absolute expiry (unix time, or None), or None when absent or expired."""
        if self._link is not None:
            await self._link.refresh()
        entry = self._index.data.get(key)
        if entry is not None:
            exp = entry[1]
            if exp is None or exp > self._clock():
                return entry
            self._forget(key, entry)
            return None
        self._check_read(key)
        return None

    async def ttl(self, key: str) -> float | None:
        """Seconds until `key` expires, or None when it has no expiry, is absent, or has expired."""
        if self._link is not None:
            await self._link.refresh()
        entry = self._index.data.get(key)
        if entry is None:
            self._check_read(key)
            return None
        if entry[1] is None:
            return None
        left = entry[1] - self._clock()
        if left <= 0:
            self._forget(key, entry)
            return None
        return left

    async def scan(self, prefix: str = "") -> AsyncIterator[str]:
        """Yield the live keys that start with `prefix`, in no particular order.

        Keys deleted or expired while the scan runs are not yielded; keys added meanwhile may or may not be.
        The scan yields to the event loop between chunks of keys, however many match.
        """
        if type(prefix) is not str:
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        if not self._open or self._fork_gen != _fork_generation:
            self._raise_unusable()
        if self._link is not None:
            await self._link.refresh()
        keys = list(self._index.data)
        for start in range(0, len(keys), SNAPSHOT_CHUNK):
            await anyio.lowlevel.checkpoint()
            if not self._open:
                self._raise_unusable()
            now = self._clock()
            data = self._index.data
            for key in keys[start : start + SNAPSHOT_CHUNK]:
                if key.startswith(prefix):
                    entry = data.get(key)
                    if entry is not None and (entry[1] is None or entry[1] > now):
                        yield key

    def __len__(self) -> int:
        """Live keys: expired keys never count, whether or not they were dropped from memory yet.
        In shared mode, as far as this process has read the file (the next async call catches up)."""
        if not self._open or self._fork_gen != _fork_generation:
            self._raise_unusable()
        index = self._index
        return len(index.data) - index.expired_count(self._clock())

    def stats(self) -> Stats:
        """Counters of an open DB. Never waits: it reads the index and the file's counters as they are."""
        if not self._open or self._fork_gen != _fork_generation:
            self._raise_unusable()
        index = self._index
        expired = index.expired_count(self._clock())
        log = self._log
        return Stats(
            keys=len(index.data) - expired,
            expired=expired,
            file_size=log.end if log else 0,
            fsyncs=log.fsyncs if log else 0,
            shrinks=self._rewriter.shrinks,
        )

    # -- writes ----------------------------------------------------------------------------------------------

    async def set(
        self,
        key: str,
        value: bytes | bytearray | memoryview,
        ttl: float | None = None,
        *,
        expire_at: float | None = None,
    ) -> None:
        """Store `value` under `key`, expiring after `ttl` seconds, or at the unix time `expire_at`
        (a time already past stores a key that is never returned); neither: never."""
        # The hot path: the common argument types are checked inline, anything else by the helpers,
        # which raise the errors the contract names.
        kb = key_bytes(key)
        if type(value) is not bytes or len(value) > _MAX_VALUE:
            value = value_bytes(value)
        if ttl is None:
            if expire_at is not None:
                expire_at = unix_time(expire_at)
        elif expire_at is not None:
            raise TypeError("give ttl or expire_at, not both")
        elif (type(ttl) is float or type(ttl) is int) and 0.0 < ttl < _FAST_TTL_LIMIT:
            expire_at = self._clock() + ttl
        else:
            expire_at = self._expire_at(ttl)
        record = _encode(_SET, kb, value, expire_at, self._salt)
        entry = (value, expire_at)
        me = _get_ident()
        if me != self._solo or _monotonic() >= self._due:  # another thread, work due, or see `_due`
            await self._write(key, partial(_planned, record, entry))
            return
        self._busy = True  # then check again that this thread is still the solo one: see `_take_guard`
        if self._solo != me:
            self._busy = False
            await self._write(key, partial(_planned, record, entry))
            return
        # The fast path: one synchronous step, as `_write` takes with the guard held.
        try:
            try:
                self._solo_step(key, record, entry)
            finally:
                self._busy = False
        except AppendFailed as failed:
            await self._recover_append(self._log, failed)  # type: ignore[arg-type]  # an append had a log

    async def update(self, key: str, change: Callable[[bytes | None], tuple[bytes, float | None] | None]) -> bool:
        """Read, change and write `key` atomically: no other write to the DB comes in between.

        `change` gets the live value (None when absent or expired) and returns the new value with its
        absolute expiry (unix time, or None for none), or None to leave the key as it is. It runs while
        writes wait, so it must be short, and it must not await. Returns True when something was written.
        An exception from `change` propagates and nothing is written; so does a value over the size cap
        (ValueError) or not bytes-like (TypeError), or an expiry that is not a finite number (ValueError,
        TypeError).
        """
        kb = key_bytes(key)
        me = _get_ident()
        if me != self._solo or _monotonic() >= self._due:  # as in `set`
            return await self._write(key, partial(self._plan_update, kb, change))
        self._busy = True
        if self._solo != me:
            self._busy = False
            return await self._write(key, partial(self._plan_update, kb, change))
        # The fast path: `_write`'s step with `_plan_update`, inlined (the session store's write path).
        try:
            try:
                data = self._index.data
                old = data.get(key)
                if old is not None and old[1] is not None and old[1] <= self._clock():
                    data.pop(key, None)  # expired (as Index.live does; a reader may have dropped it)
                    old = None
                step = self._plan_update(kb, change, old)
                if step is None:
                    return False
                self._solo_step(key, step[0], step[1])
                return True
            finally:
                self._busy = False
        except AppendFailed as failed:
            await self._recover_append(self._log, failed)  # type: ignore[arg-type]  # an append had a log

    def _plan_update(self, kb: bytes, change: Callable[[bytes | None], tuple[bytes, float | None] | None],
                     entry: Entry | None) -> tuple[bytes, Entry | None] | None:
        """`update`'s step: the record to append and the entry to install for what `change` returns."""
        new = change(None if entry is None else entry[0])
        if new is None:
            return None
        # Every write path checks the size: a record over the cap could not be read back, and the
        # file would no longer open.
        value, expire_at = new
        if type(value) is not bytes or len(value) > _MAX_VALUE:
            value = value_bytes(value)
        if expire_at is not None and not (type(expire_at) is float and -_INF < expire_at < _INF):
            expire_at = unix_time(expire_at)  # raises, or the float of a finite int
        return _encode(_SET, kb, value, expire_at, self._salt), (value, expire_at)

    async def expire(self, key: str, ttl: float | None, *, expire_at: float | None = None) -> bool:
        """Change only the expiry of `key`: `ttl` seconds from now, or the unix time `expire_at`, or (both
        None) no expiry. False, writing nothing, when the key is absent."""
        kb = key_bytes(key)
        if ttl is not None:
            if expire_at is not None:
                raise TypeError("give ttl or expire_at, not both")
            expire_at = self._expire_at(ttl)
        elif expire_at is not None:
            expire_at = unix_time(expire_at)

        def plan(entry: Entry | None) -> tuple[bytes, Entry | None] | None:
            if entry is None:
                return None
            return fmt.encode_record(fmt.EXPIRE, kb, b"", expire_at, self._salt), (entry[0], expire_at)

        return await self._write(key, plan)

    async def delete(self, key: str) -> bool:
        """Remove `key`. True if it existed; an expired key does not, and nothing is written for it."""
        kb = key_bytes(key)
        return await self._write(key, lambda entry: None if entry is None else
                                 (fmt.encode_record(fmt.DEL, kb, b"", None, self._salt), None))

    async def _write(self, key: str, plan: Callable[[Entry | None], tuple[bytes, Entry | None] | None]) -> bool:
        """The general write: wait for a closed gate, do overdue periodic work, catch up with the other
        processes (shared), then in one synchronous step: `plan` gets the key's live entry and returns the
        record to append and the entry to install (None deletes the key), or None to write nothing.
        Returns whether it wrote."""
        self._end_solo()
        link = self._link
        busy = 0  # attempts that found the append lock held by another process (shared mode)
        while True:
            if self._gate is not None:
                await self._wait_gate()
                continue
            if _monotonic() >= self._work_due and self._open:
                await self._work_as_calls_arrive()
            if link is not None:
                if busy:
                    await link.wait_turn(busy)
                if link.pending and not await link.ready_to_append():
                    continue
            self._take_guard()
            locked: bool | None = False
            try:
                log = self._writable()
                if self._gate is not None:
                    continue
                if link is not None:
                    locked = link.lock_and_catch_up()
                    if not locked:
                        if locked is None:
                            busy += 1
                        continue
                step = plan(self._index.live(key, self._clock()))
                if step is None:
                    return False
                record, entry = step
                failed = None if log is None else self._append(log, record)
                if failed is None:
                    if entry is None:
                        self._index.data.pop(key, None)
                    else:
                        self._index.put(key, entry)
            finally:
                if locked:
                    link.unlock()  # type: ignore[union-attr]
                self._guard.release()
            if log is None:
                return True
            if failed is not None:
                await self._recover_append(log, failed)
            if self._always:
                await self._sync_to(log, log.written)
            return True

    async def sync(self) -> None:
        """fsync the file now, whatever the sync policy. Does nothing for `:memory:`."""
        self._end_solo()
        log = self._writable()
        if log is not None:
            await self._sync_to(log, log.written)

    async def shrink(self) -> None:
        """Rewrite the file to the live set now; the blocking parts run in worker threads, the snapshot is
        taken on the event loop in bounded steps. Writes go on meanwhile and are kept. A shrink already in
        progress is waited for. StoreError when the rewrite fails (the old file is kept)."""
        self._end_solo()
        self._writable()
        await self._rewriter.run(explicit=True)

    # -- internals: the write path ---------------------------------------------------------------------------

    async def _wait_gate(self) -> None:
        while (gate := self._gate) is not None:
            await gate.wait(lambda: self._gate is gate)

    def _take_guard(self, blocking: bool = True) -> bool:
        """Take the guard for a synchronous step (released by the caller, never held across an await).

        The solo thread's fast-path steps (`set`, `update`) skip the guard: a thread that takes the guard
        while another thread is solo ends that, for good (every thread then takes the guard), and waits for
        the solo thread's step in progress, if any, to end. The two flags follow Dekker's rule, which the
        GIL makes sound: the solo thread sets `_busy` before it reads `_solo` (again), and this clears `_solo`
        before it reads `_busy`; so either that step sees `_solo` cleared and takes the general path, or this
        sees it busy and waits (a step is a few microseconds: no await, one write call). Only the solo thread
        ever sets `_busy` (it checks that it is solo first).
        """
        guard = self._guard
        if not guard.acquire(False):
            if not blocking:
                return False
            guard.acquire()  # another thread in a synchronous step (two loops at once): microseconds
        solo = self._solo
        if solo and solo != _get_ident():
            self._solo = 0
            while self._busy:
                os.sched_yield()  # releases the GIL to the solo thread, which ends its step
        return True

    def _end_solo(self) -> None:
        """In a thread other than the solo one: end the fast path for good (see `_take_guard`) before this
        thread changes the schedule, the gate or the file, so no fast-path step slips past the change."""
        solo = self._solo
        if solo and solo != _get_ident():
            self._take_guard()
            self._guard.release()

    def _solo_step(self, key: str, record: bytes, entry: Entry | None) -> None:
        """The synchronous step of a fast-path write (`set`, `update`): append `record`, install `entry`.
        Raises AppendFailed (the gate closed, as `_append` does) when the write call fails."""
        log = self._log
        if log is not None:
            # AppendLog.append, inlined (one write call): this is the hottest path of the engine.
            try:
                n = log._write(log.fd, record)
            except OSError as exc:
                raise self._append_failed(log, record, exc) from exc
            if n != len(record):
                raise self._append_failed(log, record, n)
            log.end += n
            log.written += n
        # Index.put, inlined.
        assert entry is not None
        data = self._index.data
        old = data.get(key)
        data[key] = entry
        expire_at = entry[1]
        if expire_at is not None and (old is None or old[1] is None or expire_at < old[1]):
            _heappush(self._index.heap, (expire_at, key))

    def _append(self, log: AppendLog, record: bytes) -> AppendFailed | None:
        """Append under the guard. On failure, close the gate (no one appends until the failed write is cut
        off, in a thread) and return the failure for `_recover_append`."""
        try:
            log.append(record)
        except AppendFailed as exc:
            self._gate = Gate()
            self._due = -math.inf
            return exc
        return None

    def _append_failed(self, log: AppendLog, record: bytes, result: int | OSError) -> AppendFailed:
        """A fast-path append that failed (`result`: what the write call returned or raised): close the gate
        as `_append` does, and return the failure for `_recover_append`."""
        self._gate = Gate()
        self._due = -math.inf
        return log.failure(record, result)

    async def _recover_append(self, log: AppendLog, exc: AppendFailed) -> NoReturn:
        """Cut what a failed append left (off the event loop), open the gate, then raise StoreError."""
        gate = self._gate
        try:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(log.truncate_to_end)
        except OSError as trunc_exc:
            self._fail(trunc_exc, "truncating a failed write")
        finally:
            self._gate = None
            self._schedule()
            if gate is not None:
                gate.event.set()
        raise StoreError(str(exc)) from exc.__cause__

    def _writable(self) -> AppendLog | None:
        """The log to append to (None for `:memory:`), or raise why this DB takes no writes now."""
        if not self._open or self._fork_gen != _fork_generation:
            self._raise_unusable()
        if self._failed is not None:
            raise StoreError(
                f"{self._abspath}: refusing writes after an I/O failure ({self._failed}); reopen the DB"
            ) from self._failed
        return self._log

    def _check_read(self, key: object) -> None:
        """Raise for a bad key or a DB that cannot serve reads."""
        check_key(key)
        if not self._open or self._fork_gen != _fork_generation:
            self._raise_unusable()

    def _raise_unusable(self) -> NoReturn:
        if self._open and self._fork_gen != _fork_generation:
            raise FileLockedError(self._abspath, "this DB was opened by the parent of this forked process")
        raise StoreError(f"{self._abspath}: the DB is closed")

    async def _sync_to(self, log: AppendLog, written: int) -> None:
        """Return once the first `written` bytes appended are durable (group commit).

        One caller at a time leads: it runs one fsync in a worker thread, covering everything appended
        so far. The others of its thread wait for that fsync; whoever it did not cover leads the next one.
        So one thread hop and one fsync serve every writer that arrived meanwhile. A caller on another
        thread (another event loop) runs its own fsync: `sync_to` serialises them.
        """
        while log.synced < written:
            if log.failed is not None:
                raise StoreError(f"{self._abspath}: fsync failed; reopen the DB") from log.failed
            batch = self._sync_batch
            if batch is not None and batch[0] == _get_ident():
                await batch[1].wait()
                continue
            event = anyio.Event()
            mine = (_get_ident(), event)
            if batch is None:
                self._sync_batch = mine
            try:
                await anyio.to_thread.run_sync(log.sync_to, log.written)
            except OSError as exc:
                if not self._open or self._log is not log:
                    raise StoreError(f"{self._abspath}: the DB was closed") from exc
                self._fail(exc, "fsync")
                raise StoreError(f"{self._abspath}: fsync failed: {exc}") from exc
            finally:
                if self._sync_batch is mine:
                    self._sync_batch = None
                event.set()

    def _fail(self, exc: BaseException, what: str) -> None:
        if self._failed is None:
            self._failed = exc
            self._due = -math.inf
            logger.error("%s failed on %s: %s; the DB refuses writes until it is reopened", what,
                         self._abspath, exc)

    def _expire_at(self, ttl: object) -> float:
        return self._clock() + seconds(ttl, "ttl")

    def _forget(self, key: str, entry: Entry) -> None:
        """Drop an expired entry a reader found (on the loop: no write is in a step right now)."""
        data = self._index.data
        if data.get(key) is entry:
            data.pop(key, None)  # a write in another thread may have dropped it meanwhile

    # -- internals: expiry -----------------------------------------------------------------------------------

    def _drop_expired_step(self) -> bool:
        """One bounded batch of expired keys dropped from memory. Returns whether more are due."""
        if not self._open or not self._take_guard(blocking=False):
            return False  # another thread is in a write step: the next pass will do it
        try:
            started = time.perf_counter()
            _, more = self._index.drop_expired(self._clock(), _CLEANUP_BATCH)
            held = time.perf_counter() - started
        finally:
            self._guard.release()
        self._cleanup_batches += 1
        self._cleanup_max_hold = max(self._cleanup_max_hold, held)
        return more

    async def _drop_expired(self) -> None:
        """Drop every expired key from memory, one bounded batch per step, yielding between steps."""
        while self._drop_expired_step() and not self._closing:
            await anyio.lowlevel.checkpoint()

    def _check_process(self) -> None:
        if self._fork_gen != _fork_generation:
            raise FileLockedError(self._abspath, "this DB was opened by the parent of this forked process")


def _planned(record: bytes, entry: Entry, _: Entry | None) -> tuple[bytes, Entry]:
    """A `_write` plan that writes `record` and installs `entry` whatever the key holds (`set`)."""
    return record, entry
