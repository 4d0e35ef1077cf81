"""`DB`: the in-memory index over the append-only file, expiry, and the background work.

Threads, not tasks: a DB holds no state tied to an event loop, so it serves asyncio and trio alike, and a
loop that ends (Starlette's TestClient runs each request on a new one) takes nothing of the DB with it.

- The event loop's thread reads the index without a lock (one dict lookup is atomic) and writes under
  `_lock`: one `write` call to the file, then the index, so the file's order is the index's order.
- One maintenance thread per open DB fsyncs once a second (`sync="everysec"`), drops expired keys from
  memory in bounded batches, and rewrites the file when it has grown enough (autoshrink).
- Worker threads (anyio's) run open, close, fsync for `sync="always"` and `db.sync()`, and `db.shrink()`.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Literal, NoReturn, get_args

import anyio
import anyio.lowlevel

from buntsession.engine import format as fmt
from buntsession.engine.log import AppendFailed, AppendLog, FileOps, Superseded
from buntsession.errors import FileLockedError, StoreError

__all__ = ["DB", "Stats", "SyncPolicy"]

logger = logging.getLogger("buntsession")

SyncPolicy = Literal["everysec", "always", "never"]
MEMORY: Final = ":memory:"

_CLEANUP_BATCH: Final = 500
"""Expired keys dropped per hold of the lock: small enough that a writer never waits long for it."""
_SNAPSHOT_CHUNK: Final = 1000
_FAST_KEY_CHARS: Final = fmt.MAX_KEY_SIZE  # an ASCII key this long encodes within the limit
_FAST_TTL_LIMIT: Final = 1 << 52  # below it an int ttl converts to float exactly and the sum stays finite
_SHRINK_RETRY_FIRST: Final = 60.0
_SHRINK_RETRY_MAX: Final = 3600.0

KeySet = set[str]  # spelled here because inside DB, `set` names the method
Entry = tuple[bytes, float | None]
"""What the index keeps per key: the value and its absolute expiry (unix seconds) or None."""

# A child process forked after open shares the parent's file and lock; it must not use them. Its copies
# of the open DBs forget their keys, so every call (reads included) finds the fork and refuses.
_fork_generation = 0
_open_dbs: weakref.WeakSet[DB] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1
    for db in list(_open_dbs):
        db._data = {}


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
        _require_int("autoshrink_percentage", autoshrink_percentage)
        _require_int("autoshrink_min_size", autoshrink_min_size)
        self.path = os.fspath(path)
        self.sync_policy: SyncPolicy = sync
        self._always = sync == "always"
        self.autoshrink = bool(autoshrink)
        self.autoshrink_percentage = autoshrink_percentage
        self.autoshrink_min_size = autoshrink_min_size
        self.cleanup_interval = _seconds(cleanup_interval, "cleanup_interval")
        self.lock_timeout = 0.0 if lock_timeout == 0 else _seconds(lock_timeout, "lock_timeout")
        self._memory = self.path == MEMORY
        self.shared = bool(shared)
        if self.shared and self._memory:
            raise ValueError("a :memory: DB cannot be shared")
        self._abspath = self.path if self._memory else os.path.abspath(self.path)

        # Seams for tests: every file operation, and the wall clock that expiry is measured against.
        self._fileops = FileOps()
        self._clock: Callable[[], float] = time.time

        self._state_lock = threading.Lock()  # open/close counting
        self._users = 0
        self._fork_gen = _fork_generation
        self._open = False
        self._lock = threading.Lock()  # writes (file then index), cleanup batches, the end of a rewrite
        self._log: AppendLog | None = None
        self._data: dict[str, Entry] = {}
        self._heap: list[tuple[float, str]] = []
        # Each key with an expiry has a heap entry at or before it. Extending an expiry pushes nothing:
        # when the old entry comes due, the cleanup pass pushes the key again at its new time.
        self._failed: BaseException | None = None
        self._worker: _Maintenance | None = None
        self._shrink_lock = threading.Lock()
        self._sync_batch: anyio.Event | None = None  # set while a group-commit fsync is in flight
        self._shrinks = 0
        self._base_size = 0
        self._shrink_retry_at = 0.0
        self._shrink_backoff = _SHRINK_RETRY_FIRST
        self._closing = False
        self._cleanup_max_hold = 0.0  # longest hold of _lock by one cleanup batch, for tests and benchmarks
        self._cleanup_batches = 0

    def __new__(cls, path: str | os.PathLike[str], *args: object, shared: bool = False, **kwargs: object) -> DB:
        if shared and cls is DB:
            from buntsession.engine.shared import SharedDB  # noqa: PLC0415  (shared imports this module)

            return super().__new__(SharedDB)
        return super().__new__(cls)

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"DB({self.path!r}, sync={self.sync_policy!r}) [{state}]"

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Lock and load the file (the first call), or count one more user (later calls)."""
        await anyio.to_thread.run_sync(self._open_blocking)

    async def close(self) -> None:
        """Count one user less; the last one fsyncs, stops the background work and releases the file.

        Closing a DB that is not open does nothing.
        """
        await anyio.to_thread.run_sync(self._close_blocking)

    async def __aenter__(self) -> DB:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _open_blocking(self) -> None:
        with self._state_lock:
            if self._users:
                self._check_process()
                self._users += 1
                return
            started = time.perf_counter()
            self._fork_gen = _fork_generation
            if not self._memory:
                # The file a symlink names is the data file: it is what a rewrite replaces (the link stays)
                # and what is locked, whichever path names it. Resolved at each open: the link may move.
                self._abspath = os.path.realpath(self.path)
            replayed: dict[str, Entry] = {}
            log = None
            if not self._memory:
                log = AppendLog.open(self._abspath, self._fileops, self.lock_timeout, _replayer(replayed),
                                     self._shared_options())
            self._install_index(replayed)
            self._log = log
            self._failed, self._closing, self._shrinks = None, False, 0
            self._shrink_retry_at, self._shrink_backoff = 0.0, _SHRINK_RETRY_FIRST
            self._open = True
            self._users = 1
            _open_dbs.add(self)
            self._worker = _Maintenance(self)
            self._worker.start()
            if log is not None:
                logger.info("opened %s%s: %d keys, %d bytes, in %.3f s", self._abspath,
                            " (shared)" if self.shared else "", len(self._data), log.end,
                            time.perf_counter() - started)

    def _install_index(self, replayed: dict[str, Entry]) -> None:
        """Make the replayed records the index: drop what has expired, build the expiry heap."""
        now = self._clock()
        data = {key: entry for key, entry in replayed.items() if entry[1] is None or entry[1] > now}
        heap = [(exp, key) for key, (_, exp) in data.items() if exp is not None]
        heapq.heapify(heap)
        self._data, self._heap = data, heap
        self._base_size = _live_size(data)

    def _shared_options(self) -> str | None:
        """What every process sharing the file must agree on (None: not shared)."""
        return None

    def _exclusive(self, final: bool) -> AbstractContextManager[object]:
        """What a rewrite holds while it takes its snapshot and while it swaps the files."""
        return self._lock

    def _close_blocking(self) -> None:
        with self._state_lock:
            if not self._users:
                return
            if self._fork_gen != _fork_generation:
                # A forked child: forget its copy. Locks may have been held by threads that did not
                # survive the fork, and the file and its lock are the parent's: touch neither.
                self._users, self._open, self._log, self._worker = 0, False, None, None
                self._data, self._heap = {}, []
                return
            self._users -= 1
            if self._users:
                return
            self._release()

    def _release(self) -> None:
        self._closing = True  # a rewrite in progress gives up at its next chunk
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop()
        with self._shrink_lock, self._lock:
            self._open = False
            log, self._log = self._log, None
        _open_dbs.discard(self)
        self._data, self._heap = {}, []
        if log is None:
            return
        error: OSError | None = None
        if self._failed is None:
            try:
                log.sync_to(log.written)
            except OSError as exc:
                logger.error("fsync of %s at close failed: %s", log.path, exc)
                error = exc
        log.close()
        if error is not None:
            raise StoreError(f"{self._abspath}: fsync at close failed; writes since the last fsync may be lost") \
                from error

    # -- reads -----------------------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        """The value of `key`, or None when it is absent or expired."""
        # A closed DB, and a forked child's copy, hold no keys: a hit needs no further checks.
        entry = self._data.get(key)
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
        entry = self._data.get(key)
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
        entry = self._data.get(key)
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
        keys = list(self._data)  # one C-level copy: atomic with respect to other threads
        for start in range(0, len(keys), _SNAPSHOT_CHUNK):
            await anyio.lowlevel.checkpoint()
            if not self._open:
                self._raise_unusable()
            now = self._clock()
            for key in keys[start : start + _SNAPSHOT_CHUNK]:
                if key.startswith(prefix):
                    entry = self._data.get(key)
                    if entry is not None and (entry[1] is None or entry[1] > now):
                        yield key

    def __len__(self) -> int:
        """Live keys: expired keys never count, whether or not they were dropped from memory yet."""
        if not self._open or self._fork_gen != _fork_generation:
            self._raise_unusable()
        with self._lock:
            return len(self._data) - len(self._expired_keys(self._clock()))

    def stats(self) -> Stats:
        """Counters of an open DB."""
        if not self._open or self._fork_gen != _fork_generation:
            self._raise_unusable()
        with self._lock:
            expired = len(self._expired_keys(self._clock()))
            log = self._log
            return Stats(
                keys=len(self._data) - expired,
                expired=expired,
                file_size=log.end if log else 0,
                fsyncs=log.fsyncs if log else 0,
                shrinks=self._shrinks,
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
        if type(key) is str and key and len(key) <= _FAST_KEY_CHARS and key.isascii():
            kb = key.encode()
        else:
            kb = _key_bytes(key)
        if type(value) is not bytes or len(value) > fmt.MAX_VALUE_SIZE:
            value = _value_bytes(value)
        if ttl is None:
            if expire_at is not None:
                expire_at = _unix_time(expire_at)
        elif expire_at is not None:
            raise TypeError("give ttl or expire_at, not both")
        elif (type(ttl) is int or type(ttl) is float) and 0 < ttl < _FAST_TTL_LIMIT:
            expire_at = self._clock() + ttl
        else:
            expire_at = self._expire_at(ttl)
        record = fmt.encode_record(fmt.SET, kb, value, expire_at)
        if not self._lock.acquire(False):  # positional: the keyword form costs twice as much
            await self._wait_for_lock()
        try:
            if not self._open or self._failed is not None or self._fork_gen != _fork_generation:
                self._writable()  # raises why
            log = self._log
            if log is not None:
                try:
                    log.append(record)
                except AppendFailed as exc:
                    await self._recover_append(log, exc)
            self._put(key, (value, expire_at))
        finally:
            self._lock.release()
        if self._always and log is not None:
            await self._sync_to(log, log.written)

    async def update(self, key: str, change: Callable[[bytes | None], tuple[bytes, float | None] | None]) -> bool:
        """Read, change and write `key` atomically: no other write to the DB comes in between.

        `change` gets the live value (None when absent or expired) and returns the new value with its
        absolute expiry (unix time, or None for none), or None to leave the key as it is. It runs while
        writes wait, so it must be short, and it must not await. Returns True when something was written.
        An exception from `change` propagates and nothing is written.
        """
        kb = _key_bytes(key)

        def plan(entry: Entry | None) -> tuple[bytes, Entry | None] | None:
            new = change(None if entry is None else entry[0])
            if new is None:
                return None
            # Every write path checks the size: a record over the cap could not be read back, and the
            # file would no longer open.
            value = new[0]
            if type(value) is not bytes or len(value) > fmt.MAX_VALUE_SIZE:
                value = _value_bytes(value)
            expire_at = None if new[1] is None else _unix_time(new[1])
            return fmt.encode_record(fmt.SET, kb, value, expire_at), (value, expire_at)

        return await self._write(key, plan)

    async def expire(self, key: str, ttl: float | None, *, expire_at: float | None = None) -> bool:
        """Change only the expiry of `key`: `ttl` seconds from now, or the unix time `expire_at`, or (both
        None) no expiry. False, writing nothing, when the key is absent."""
        kb = _key_bytes(key)
        if ttl is not None:
            if expire_at is not None:
                raise TypeError("give ttl or expire_at, not both")
            expire_at = self._expire_at(ttl)
        elif expire_at is not None:
            expire_at = _unix_time(expire_at)

        def plan(entry: Entry | None) -> tuple[bytes, Entry | None] | None:
            if entry is None:
                return None
            return fmt.encode_record(fmt.EXPIRE, kb, b"", expire_at), (entry[0], expire_at)

        return await self._write(key, plan)

    async def delete(self, key: str) -> bool:
        """Remove `key`. True if it existed; an expired key does not, and nothing is written for it."""
        kb = _key_bytes(key)
        return await self._write(key, lambda entry: None if entry is None else
                                 (fmt.encode_record(fmt.DEL, kb, b"", None), None))

    async def _write(self, key: str, plan: Callable[[Entry | None], tuple[bytes, Entry | None] | None]) -> bool:
        """Under the write lock: `plan` gets the key's live entry and returns the record to append and the
        entry to install (None deletes the key), or None to write nothing. Returns whether it wrote."""
        if not self._lock.acquire(False):
            await self._wait_for_lock()
        try:
            log = self._writable()
            step = plan(self._live(key))
            if step is None:
                return False
            record, entry = step
            if log is not None:
                await self._append(log, record)
            if entry is None:
                del self._data[key]
            else:
                self._put(key, entry)
        finally:
            self._lock.release()
        if self._always and log is not None:
            await self._sync_to(log, log.written)
        return True

    async def sync(self) -> None:
        """fsync the file now, whatever the sync policy. Does nothing for `:memory:`."""
        log = self._writable()
        if log is not None:
            await self._sync_to(log, log.written)

    async def shrink(self) -> None:
        """Rewrite the file to the live set now, off the event loop. Writes go on meanwhile and are kept."""
        self._writable()
        await anyio.to_thread.run_sync(self._shrink_blocking, True)

    # -- internals: the write path ---------------------------------------------------------------------------

    async def _wait_for_lock(self) -> None:
        # _lock is held briefly by a cleanup batch or the end of a rewrite, in another thread. Wait by
        # sleeping, so the loop serves other tasks meanwhile and a cancelled wait holds nothing.
        delay = 0.0001
        while not self._lock.acquire(False):
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.005)

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
        _check_key(key)
        if not self._open or self._fork_gen != _fork_generation:
            self._raise_unusable()

    def _raise_unusable(self) -> None:
        if self._open and self._fork_gen != _fork_generation:
            raise FileLockedError(self._abspath, "this DB was opened by the parent of this forked process")
        raise StoreError(f"{self._abspath}: the DB is closed")

    async def _append(self, log: AppendLog, record: bytes) -> None:
        try:
            log.append(record)
        except AppendFailed as exc:
            await self._recover_append(log, exc)

    async def _recover_append(self, log: AppendLog, exc: AppendFailed) -> NoReturn:
        """Cut what a failed append left (off the event loop), then raise StoreError."""
        try:
            await anyio.to_thread.run_sync(log.truncate_to_end)
        except OSError as trunc_exc:
            self._fail(trunc_exc, "truncating a failed write")
        raise StoreError(str(exc)) from exc.__cause__

    async def _sync_to(self, log: AppendLog, written: int) -> None:
        """Return once the first `written` bytes appended are durable (group commit).

        One caller at a time leads: it runs one fsync in a worker thread, covering everything appended
        so far. The others wait for that fsync; whoever it did not cover leads the next one. So one
        thread hop and one fsync serve every writer that arrived meanwhile.
        """
        while log.synced < written:
            if log.failed is not None:
                raise StoreError(f"{self._abspath}: fsync failed; reopen the DB") from log.failed
            batch = self._sync_batch
            if batch is not None:
                await batch.wait()
                continue
            batch = self._sync_batch = anyio.Event()
            try:
                await anyio.to_thread.run_sync(log.sync_to, log.written)
            except OSError as exc:
                if not self._open:
                    raise StoreError(f"{self._abspath}: the DB was closed") from exc
                self._fail(exc, "fsync")
                raise StoreError(f"{self._abspath}: fsync failed: {exc}") from exc
            finally:
                self._sync_batch = None
                batch.set()

    def _fail(self, exc: BaseException, what: str) -> None:
        if self._failed is None:
            self._failed = exc
            logger.error("%s failed on %s: %s; the DB refuses writes until it is reopened", what,
                         self._abspath, exc)

    def _expire_at(self, ttl: object) -> float:
        return self._clock() + _seconds(ttl, "ttl")

    # -- internals: the index --------------------------------------------------------------------------------

    def _put(self, key: str, entry: Entry) -> None:
        """Install `entry`; the caller holds _lock."""
        old = self._data.get(key)
        self._data[key] = entry
        exp = entry[1]
        if exp is not None and (old is None or old[1] is None or exp < old[1]):
            heapq.heappush(self._heap, (exp, key))

    def _live(self, key: str) -> Entry | None:
        """The entry of `key` if it is live; an expired one is dropped. The caller holds _lock."""
        entry = self._data.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= self._clock():
            del self._data[key]
            return None
        return entry

    def _forget(self, key: str, entry: Entry) -> None:
        """Drop an expired entry found by a reader, unless the lock is busy (cleanup will get it)."""
        if self._lock.acquire(False):
            try:
                if self._data.get(key) is entry:
                    del self._data[key]
            finally:
                self._lock.release()

    def _expired_keys(self, now: float) -> KeySet:
        """Keys in memory whose expiry has passed. Visits only the heap entries that are due."""
        heap, data = self._heap, self._data
        found: KeySet = set()
        stack = [0] if heap else []
        while stack:
            i = stack.pop()
            at, key = heap[i]
            if at > now:
                continue
            entry = data.get(key)
            if entry is not None and entry[1] is not None and entry[1] <= now:
                found.add(key)
            stack.extend(c for c in (2 * i + 1, 2 * i + 2) if c < len(heap))
        return found

    def _drop_expired(self) -> int:
        """Drop expired keys from memory in batches of at most _CLEANUP_BATCH per hold of the lock."""
        dropped = 0
        heap, data = self._heap, self._data
        while not self._closing:
            with self._lock:
                started = time.perf_counter()
                now = self._clock()
                n = 0
                while heap and heap[0][0] <= now and n < _CLEANUP_BATCH:
                    _, key = heapq.heappop(heap)
                    n += 1
                    entry = data.get(key)
                    if entry is None or entry[1] is None:
                        continue  # deleted or made persistent since
                    if entry[1] <= now:
                        del data[key]
                        dropped += 1
                    else:
                        heapq.heappush(heap, (entry[1], key))  # extended since: come back then
                held = time.perf_counter() - started
            self._cleanup_batches += 1
            self._cleanup_max_hold = max(self._cleanup_max_hold, held)
            if n < _CLEANUP_BATCH:
                break
            time.sleep(0)  # let the event loop's thread take the GIL between batches
        return dropped

    # -- internals: background work --------------------------------------------------------------------------

    def _background_sync(self) -> None:
        log = self._log
        if log is None or self._failed is not None or log.synced >= log.written:
            return
        try:
            log.sync_to(log.written)
        except OSError as exc:
            if self._open:
                self._fail(exc, "background fsync")

    def _shrink_due(self) -> bool:
        log = self._log
        if not self.autoshrink or log is None or self._failed is not None:
            return False
        base = self._base_size
        return (
            log.end > self.autoshrink_min_size
            and log.end > base + base * self.autoshrink_percentage // 100
            and time.monotonic() >= self._shrink_retry_at
        )

    def _shrink_blocking(self, explicit: bool) -> None:
        with self._shrink_lock:
            log = self._writable()
            if log is None:
                return

            def take_snapshot() -> tuple[int, Iterator[bytes]]:
                with self._exclusive(final=False):
                    self._writable()
                    return log.end, self._snapshot(list(self._data))

            start = log.end
            started = time.perf_counter()
            try:
                size = log.rewrite(take_snapshot, self._exclusive(final=True))
            except (_Aborted, Superseded):
                return  # closing, or another sharer rewrote the file first (the next call reloads it)
            except OSError as exc:
                if log.failed is not None:
                    self._fail(exc, "directory fsync after a rewrite")
                self._shrink_retry_at = time.monotonic() + self._shrink_backoff
                self._shrink_backoff = min(self._shrink_backoff * 2, _SHRINK_RETRY_MAX)
                logger.error("rewrite of %s failed: %s; the old file is kept", self._abspath, exc)
                if explicit:
                    raise StoreError(f"{self._abspath}: rewrite failed: {exc}") from exc
                return
            self._shrinks += 1
            self._base_size = size
            self._shrink_backoff = _SHRINK_RETRY_FIRST
            logger.info("shrank %s from %d to %d bytes in %.3f s", self._abspath, start, size,
                        time.perf_counter() - started)

    def _snapshot(self, keys: list[str]) -> Iterator[bytes]:
        """The live entries of `keys` as SET records, chunk by chunk, read without the lock.

        Each entry is read at some moment after the snapshot began; the rewrite then appends every record
        written since it began, so a key's last record in the new file is its latest state either way.
        """
        data, encode, now = self._data, fmt.encode_record, self._clock()
        for start in range(0, len(keys), _SNAPSHOT_CHUNK):
            if self._closing:
                raise _Aborted
            parts = []
            for key in keys[start : start + _SNAPSHOT_CHUNK]:
                entry = data.get(key)
                if entry is not None and (entry[1] is None or entry[1] > now):
                    parts.append(encode(fmt.SET, key.encode(), entry[0], entry[1]))
            yield b"".join(parts)
            time.sleep(0)  # hand the GIL to the event loop's thread between chunks

    def _check_process(self) -> None:
        if self._fork_gen != _fork_generation:
            raise FileLockedError(self._abspath, "this DB was opened by the parent of this forked process")


class _Aborted(Exception):
    """A rewrite gave up because the DB is closing."""


class _Maintenance(threading.Thread):
    """The background pass of one open DB: everysec fsync, expiry cleanup, autoshrink."""

    def __init__(self, db: DB) -> None:
        super().__init__(name=f"buntsession maintenance {db.path}", daemon=True)
        self._db = db
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()
        self.join()

    def run(self) -> None:
        db = self._db
        next_sync = next_cleanup = time.monotonic()
        while True:
            now = time.monotonic()
            if db.sync_policy == "everysec" and now >= next_sync:
                db._background_sync()
                next_sync = now + 1.0
            if now >= next_cleanup:
                db._drop_expired()
                next_cleanup = now + db.cleanup_interval
            if db._shrink_due():
                try:
                    db._shrink_blocking(False)
                except StoreError:
                    pass  # already failed or closed: nothing to shrink
            wake = min(next_cleanup, now + 1.0)
            if db.sync_policy == "everysec":
                wake = min(wake, next_sync)
            if self._stopped.wait(max(0.0, wake - time.monotonic())):
                return


# -- argument checks -----------------------------------------------------------------------------------------


def _replayer(data: dict[str, Entry]) -> fmt.Apply:
    """Apply records to `data` in file order, as they were applied when written.

    Expiry is not judged here: a later EXPIRE may have extended a SET's expiry, and a record only follows
    an expired key when it replaces it. The caller drops what has expired once every record is in.
    """

    def apply(rtype: int, key: str, value: bytes, expire_at: float | None) -> None:
        if rtype == fmt.SET:
            data[key] = (value, expire_at)
        elif rtype == fmt.DEL:
            data.pop(key, None)
        else:
            entry = data.get(key)
            if entry is not None:
                data[key] = (entry[0], expire_at)

    return apply


def _live_size(data: dict[str, Entry]) -> int:
    """Bytes the live set takes in a freshly rewritten file: the autoshrink base at open."""
    total = fmt.FILE_HEADER_SIZE
    for key, (value, _) in data.items():
        total += fmt.RECORD_HEADER_SIZE + (len(key) if key.isascii() else len(key.encode())) + len(value)
    return total


def _check_key(key: object) -> None:
    if not isinstance(key, str):
        raise TypeError(f"keys are str, not {type(key).__name__}")
    if not key:
        raise ValueError("keys must not be empty")


def _key_bytes(key: object) -> bytes:
    _check_key(key)
    assert isinstance(key, str)
    try:
        kb = key.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(f"key {key!r} is not valid Unicode") from exc
    if len(kb) > fmt.MAX_KEY_SIZE:
        raise ValueError(f"key of {len(kb)} bytes is over the limit of {fmt.MAX_KEY_SIZE}")
    return kb


def _value_bytes(value: object) -> bytes:
    """`value` as bytes: anything with the buffer protocol (bytes, bytearray, memoryview, array.array...),
    its raw bytes in memory order. TypeError for anything else (a str included); ValueError over the cap."""
    if type(value) is bytes:
        data = value
    else:
        try:
            with memoryview(value) as view:  # type: ignore[arg-type]  # any buffer: checked by the call
                nbytes = view.nbytes
                if nbytes > fmt.MAX_VALUE_SIZE:
                    raise ValueError(f"value of {nbytes} bytes is over the limit of {fmt.MAX_VALUE_SIZE}")
                data = view.tobytes()
        except TypeError:
            raise TypeError(f"values are bytes-like, not {type(value).__name__}") from None
    if len(data) > fmt.MAX_VALUE_SIZE:
        raise ValueError(f"value of {len(data)} bytes is over the limit of {fmt.MAX_VALUE_SIZE}")
    return data


def _show(value: object) -> str:
    """`repr(value)` cut short: an error message never spells out a number of 400 digits."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"{'-' if value < 0 else ''}an int of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _seconds(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError(f"{name} {_show(value)} is too large") from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{name} must be positive and finite, not {_show(value)}")
    return seconds


def _unix_time(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expire_at must be a unix time in seconds, not {type(value).__name__}")
    try:
        at = float(value)
    except OverflowError:
        at = math.inf
    if not math.isfinite(at):
        raise ValueError(f"expire_at must be finite, not {_show(value)}")
    return at


def _require_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, not {_show(value)}")
