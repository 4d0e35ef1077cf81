"""The data file: lock, load, append, fsync and rewrite. Blocking code; the DB decides which thread runs it.

Every system call goes through a `FileOps` object, the seam that fault tests use to inject short writes,
failed fsyncs, pauses between the phases of a rewrite, or a file that keeps only what was fsynced.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

from buntsession.engine import format as fmt
from buntsession.errors import CorruptFileError, FileLockedError, StoreError

logger = logging.getLogger("buntsession")

REWRITE_SUFFIX = ".rewrite"
"""The temporary file of a rewrite sits beside the data file under this suffix; an open removes a leftover."""
LOCK_SUFFIX = ".lock"
"""In shared mode, the processes take turns to append by locking this file, which a rewrite never replaces;
it also holds the options the sharers agreed on."""

_COPY_CHUNK = 1 << 20


class FileOps:
    """Thin wrappers over the system calls the engine makes. Tests subclass it to inject faults."""

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags | os.O_CLOEXEC, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    # The one call on every DB write: the builtin itself, so the seam costs no extra Python frame.
    write = staticmethod(os.write)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def read_all(self, fd: int, size: int) -> bytes | mmap.mmap:
        """The first `size` bytes of the file, mapped rather than copied where possible."""
        return mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else b""

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    def stat(self, path: str) -> os.stat_result:
        return os.stat(path)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def try_lock(self, fd: int, shared: bool = False) -> bool:
        """Take the exclusive (or shared) lock without waiting. False when another holder prevents it."""
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def unlock(self, fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

    def phase(self, name: str) -> None:
        """Called after each phase of a rewrite: snapshot, tail, fsync, rename, dirsync. Does nothing here."""


class AppendFailed(Exception):
    """An append did not complete. The caller must call `truncate_to_end` off the event loop."""


class Superseded(Exception):
    """Another process rewrote the shared file first: this rewrite gave up, and the file must be reloaded."""


class AppendLog:
    """One open data file. The owner serialises `append`, `truncate_to_end` and the end of `rewrite`."""

    def __init__(self, path: str, fd: int, end: int, ops: FileOps, lock_fd: int | None = None) -> None:
        self.path = path
        self.fd = fd
        self.inode = ops.fstat(fd).st_ino
        self.lock_fd = lock_fd
        """Shared mode: the descriptor of the lock file the sharers append under (None: one owner)."""
        self.end = end
        """Bytes of complete, acknowledged records in the current file."""
        self.written = 0
        """Bytes appended since open, across rewrites: group commit compares it with `synced`."""
        self.synced = 0
        self.fsyncs = 0
        self.failed: OSError | None = None
        """Set when an fsync failed: what was written since the last good fsync may be lost, and a later
        fsync that succeeds proves nothing about it (the kernel may have dropped the dirty pages)."""
        self.sync_lock = threading.Lock()
        """Held by fsync and by the file swap at the end of a rewrite, so an fsync never sees a closed fd."""
        self._ops = ops

    # -- opening -----------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: str, ops: FileOps, lock_timeout: float, apply: fmt.Apply, shared_options: str | None = None
    ) -> AppendLog:
        """Lock the file (creating it if absent) and replay its records through `apply`.

        Raises StoreError for a path that cannot hold a data file, FileLockedError when another owner
        holds it past `lock_timeout`, CorruptFileError for damage (the file is left as it was).
        A torn tail is cut off with a warning.

        With `shared_options` the file is opened in shared mode: a shared lock on the data file (so no
        exclusive owner can take it) and the sharers' append lock, held while the file loads; the options
        must equal those of the processes already sharing it.
        """
        try:
            return cls._open(path, ops, lock_timeout, apply, shared_options)
        except OSError as exc:
            # Any refusal of the OS (a read-only directory, a full disk while creating the file...) is a
            # StoreError that names the path, never a raw OSError: through the middleware, a 503.
            raise StoreError(f"{path}: cannot open the data file: {exc.strerror or exc}") from exc

    @classmethod
    def _open(
        cls, path: str, ops: FileOps, lock_timeout: float, apply: fmt.Apply, shared_options: str | None
    ) -> AppendLog:
        _check_path(path, ops)
        lock_fd = None if shared_options is None else _take_append_lock(path, ops, lock_timeout)
        try:
            fd, created = _open_locked(path, ops, lock_timeout, shared_options, lock_fd)
            try:
                size = ops.fstat(fd).st_size
                _remove_leftover(path + REWRITE_SUFFIX, ops)
                if created or size == 0:
                    end = _initialise(path, fd, ops, size)
                else:
                    end = _load(path, fd, size, ops, apply)
            except BaseException:
                ops.close(fd)
                raise
        except BaseException:
            if lock_fd is not None:
                ops.close(lock_fd)
            raise
        if lock_fd is not None:
            ops.unlock(lock_fd)
        return cls(path, fd, end, ops, lock_fd)

    # -- writing -----------------------------------------------------------------------------------------

    def append(self, data: bytes) -> None:
        """Write one record (or batch) with one write call. Raises AppendFailed, leaving `end` unchanged."""
        try:
            n = self._ops.write(self.fd, data)
        except OSError as exc:
            raise AppendFailed(f"write to {self.path} failed: {exc}") from exc
        if n != len(data):
            raise AppendFailed(f"short write to {self.path}: {n} of {len(data)} bytes (out of space?)")
        self.end += n
        self.written += n

    def truncate_to_end(self) -> None:
        """Cut whatever a failed append left after the last complete record. Blocking."""
        self._ops.ftruncate(self.fd, self.end)

    def sync_to(self, written: int) -> bool:
        """Make the first `written` appended bytes durable; one fsync serves every caller waiting for it.

        Returns True when this call ran the fsync. Blocking; raises OSError when fsync fails.
        """
        with self.sync_lock:
            if self.failed is not None:
                raise OSError(errno.EIO, f"an earlier fsync of {self.path} failed") from self.failed
            if self.synced >= written:
                return False
            if self.fd < 0:
                raise OSError(errno.EBADF, "the data file is closed", self.path)
            target = self.written
            try:
                self._ops.fsync(self.fd)
            except OSError as exc:
                self.failed = exc
                raise
            self.fsyncs += 1
            self.synced = max(self.synced, target)
            return True

    def close(self) -> None:
        """Close the file. The lock goes with the last descriptor of it (never unlocked by hand: a forked
        child shares the lock with its parent, and unlocking it there would free the parent's file)."""
        with self.sync_lock:
            fd, self.fd = self.fd, -1
            if fd >= 0:
                self._ops.close(fd)
            lock_fd, self.lock_fd = self.lock_fd, None
            if lock_fd is not None:
                self._ops.close(lock_fd)

    # -- shared mode: other processes append too ---------------------------------------------------------

    def try_append_lock(self) -> bool:
        """Take the sharers' append lock without waiting (a non-blocking call, fine on the event loop)."""
        assert self.lock_fd is not None
        return self._ops.try_lock(self.lock_fd)

    def append_lock(self) -> None:
        """Take the sharers' append lock, waiting for it. Blocking."""
        assert self.lock_fd is not None
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)

    def append_unlock(self) -> None:
        assert self.lock_fd is not None
        self._ops.unlock(self.lock_fd)

    def behind(self) -> bool:
        """Whether another process appended to the file or replaced it since we last read it: one stat."""
        try:
            st = self._ops.stat(self.path)
        except FileNotFoundError:
            return True
        return st.st_ino != self.inode or st.st_size != self.end

    def replaced(self) -> bool:
        return not _same_file(self._ops.fstat(self.fd), self.path, self._ops)

    def catch_up(self, apply: fmt.Apply, holding_append_lock: bool) -> None:
        """Apply the complete records other processes appended since our end. Blocking; CorruptFileError
        for damage. An incomplete record at the end is one being written, and stops the catch-up before
        it; but to a caller holding the append lock no one is writing: it is what a killed writer left,
        and it is cut off, as an open would cut a torn tail."""
        size = self._ops.fstat(self.fd).st_size
        if size <= self.end:
            return
        fresh = self._ops.pread(self.fd, size - self.end, self.end)
        with memoryview(fresh) as view:
            done, damage = fmt.replay(view, 0, apply)
        if damage is not None and (damage.fatal or damage.next_valid is not None):
            raise CorruptFileError(self.path, self.end + damage.offset, damage.reason)
        self.end += done
        if damage is not None and holding_append_lock:
            self._cut_tail(size)

    def _cut_tail(self, size: int) -> None:
        logger.warning("%s: torn tail at byte offset %d, left by a process that died writing: dropping %d bytes",
                       self.path, self.end, size - self.end)
        self._ops.ftruncate(self.fd, self.end)

    def reopen(self, apply: fmt.Apply, install: Callable[[], None], holding_append_lock: bool) -> None:
        """Move to the file another process's rewrite put at the path, replaying it whole. Blocking. An
        incomplete record at its end is treated as `catch_up` treats one.

        `install` runs between the replay and the move: readers that do not lock see the new position
        only once the index built from it is in place, or they would take a stale index for a fresh one.
        """
        ops = self._ops
        fd = ops.open(self.path, os.O_RDWR | os.O_APPEND)
        try:
            if not ops.try_lock(fd, shared=True):
                raise FileLockedError(self.path, "an exclusive owner took the file over")
            st = ops.fstat(fd)
            data = ops.read_all(fd, st.st_size)
            try:
                with memoryview(data) as view:
                    fmt.check_file_header(view)
                    end, damage = fmt.replay(view, fmt.FILE_HEADER_SIZE, apply)
            finally:
                if isinstance(data, mmap.mmap):
                    data.close()
            if damage is not None and (damage.fatal or damage.next_valid is not None):
                raise CorruptFileError(self.path, damage.offset, damage.reason)
            install()
        except BaseException:
            ops.close(fd)
            raise
        with self.sync_lock:
            old, self.fd, self.end, self.inode = self.fd, fd, end, st.st_ino
            self.synced = self.written  # what we wrote is in the new file, which its writer fsynced
            ops.close(old)
        if damage is not None and holding_append_lock:
            self._cut_tail(st.st_size)

    # -- rewriting ---------------------------------------------------------------------------------------

    def rewrite(
        self, take_snapshot: Callable[[], tuple[int, Iterable[bytes]]], write_lock: AbstractContextManager[object]
    ) -> int:
        """Replace the file with the header, a snapshot of the live set, and the records appended since.

        `take_snapshot` returns the end of the file when it took the snapshot and the snapshot's chunks;
        it is called once this rewrite holds the temporary file's lock, so no other process can replace
        the file until this rewrite is done. The tail appended since the snapshot is copied without
        `write_lock` first, then the rest under it, so writers wait only for the last few bytes, an fsync,
        the rename and the directory fsync. A crash at any point leaves the whole old or the whole new file
        at the path. Returns the new size. Blocking; raises OSError.
        """
        ops = self._ops
        tmp = self.path + REWRITE_SUFFIX
        fd = ops.open(tmp, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        if not ops.try_lock(fd):  # a sharer is rewriting the file right now: leave it to them
            ops.close(fd)
            raise Superseded(self.path)
        renamed = False
        try:
            ops.ftruncate(fd, 0)
            start, snapshot = take_snapshot()
            size = write_all(ops, fd, fmt.encode_file_header())
            for chunk in snapshot:
                size += write_all(ops, fd, chunk)
            ops.phase("snapshot")
            copied = self._copy(fd, start, self.end)
            ops.phase("tail")
            ops.fsync(fd)
            ops.phase("fsync")
            with write_lock, self.sync_lock:
                if not _same_file(ops.fstat(self.fd), self.path, ops):
                    raise Superseded(self.path)
                if self.end > copied:
                    copied = self._copy(fd, copied, self.end)
                    ops.fsync(fd)
                size += copied - start
                if not ops.try_lock(fd, shared=self.lock_fd is not None):
                    raise OSError(errno.EAGAIN, "could not lock the rewritten file", tmp)
                ops.replace(tmp, self.path)
                renamed = True
                # From here on the path names the new file: swap to it whatever happens next, or
                # writes would go to a file that is no longer linked.
                old, self.fd, self.end, self.inode = self.fd, fd, size, ops.fstat(fd).st_ino
                self.synced = self.written
                ops.close(old)
                ops.phase("rename")
                ops.fsync_dir(self.path)
                ops.phase("dirsync")
            return size
        except BaseException as exc:
            if not renamed:
                ops.close(fd)
                _remove_leftover(tmp, ops)
            elif isinstance(exc, OSError):
                self.failed = exc  # the new file is in place, but its directory entry may not be durable
            raise

    def _copy(self, dst: int, begin: int, end: int) -> int:
        pos = begin
        while pos < end:
            chunk = self._ops.pread(self.fd, min(_COPY_CHUNK, end - pos), pos)
            if not chunk:
                raise OSError(errno.EIO, "data file shorter than its records", self.path)
            write_all(self._ops, dst, chunk)
            pos += len(chunk)
        return pos


def write_all(ops: FileOps, fd: int, data: bytes | memoryview) -> int:
    """Write all of `data`, looping on short writes: only for files no reader trusts before an fsync."""
    done = 0
    while done < len(data):
        n = ops.write(fd, data[done:] if done else data)
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        done += n
    return done


def _check_path(path: str, ops: FileOps) -> None:
    parent = os.path.dirname(path) or "."
    try:
        pst = ops.stat(parent)
    except FileNotFoundError as exc:
        raise StoreError(f"{path}: the directory {parent!r} does not exist") from exc
    except OSError as exc:
        raise StoreError(f"{path}: cannot use the directory {parent!r}: {exc.strerror}") from exc
    if not stat.S_ISDIR(pst.st_mode):
        raise StoreError(f"{path}: {parent!r} is not a directory")
    try:
        st = ops.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"{path}: cannot use this path: {exc.strerror}") from exc
    _check_regular(path, st)


def _check_regular(path: str, st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    kind = (
        "a directory" if stat.S_ISDIR(st.st_mode)
        else "a FIFO" if stat.S_ISFIFO(st.st_mode)
        else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        else "a socket" if stat.S_ISSOCK(st.st_mode)
        else "not a regular file"
    )
    raise StoreError(f"{path}: the path is {kind}, not a data file")


def _open_locked(
    path: str, ops: FileOps, lock_timeout: float, shared_options: str | None = None, lock_fd: int | None = None
) -> tuple[int, bool]:
    """Open (or create) the file and take its lock, waiting up to `lock_timeout` seconds.

    The lock is on the data file itself: exclusive for one owner, shared for sharers. A rewrite replaces
    the file under its owner's lock, so after taking the lock we check that the path still names the file
    we locked, and start over if not.
    """
    deadline = time.monotonic() + lock_timeout
    while True:
        created = False
        try:
            fd = ops.open(path, os.O_RDWR | os.O_APPEND | os.O_NONBLOCK)
        except FileNotFoundError:
            try:
                fd = ops.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                if os.path.islink(path):  # a dangling symlink: the caller resolves links, so it changed
                    raise StoreError(f"{path}: a symlink to a missing file") from None
                continue  # created meanwhile by another opener: open that one
            created = True
        except OSError as exc:
            raise StoreError(f"{path}: cannot open the data file: {exc.strerror}") from exc
        try:
            _check_regular(path, ops.fstat(fd))
            os.set_blocking(fd, True)
            while not _lock_data_file(path, fd, ops, shared_options, lock_fd):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    who = ("an owner that opened it without shared=True" if shared_options is not None
                           else "another owner (a process or a DB object)")
                    raise FileLockedError(path, f"the data file is held by {who}")
                time.sleep(min(0.05, remaining))
            if _same_file(ops.fstat(fd), path, ops):
                return fd, created
        except BaseException:
            ops.close(fd)
            raise
        ops.close(fd)  # replaced by its owner's rewrite while we waited: lock the new file instead


def _lock_data_file(path: str, fd: int, ops: FileOps, shared_options: str | None, lock_fd: int | None) -> bool:
    """One attempt at the data file's lock. A sharer (holding the append lock) that finds no other holder
    records the options; one that joins others must have the same options."""
    if shared_options is None:
        return ops.try_lock(fd)
    assert lock_fd is not None
    if ops.try_lock(fd):  # alone: the first sharer sets the options, then shares the lock
        ops.ftruncate(lock_fd, 0)
        write_all(ops, lock_fd, shared_options.encode())
        return ops.try_lock(fd, shared=True)  # a conversion: an exclusive opener may slip in, then we retry
    if not ops.try_lock(fd, shared=True):
        return False
    agreed = ops.pread(lock_fd, 1 << 16, 0).decode(errors="replace")
    if agreed != shared_options:
        ops.unlock(fd)
        raise FileLockedError(path, f"it is shared with other options ({agreed}; these are {shared_options})")
    return True


def _take_append_lock(path: str, ops: FileOps, lock_timeout: float) -> int:
    """Open the sharers' lock file and take its lock, which appenders hold only briefly."""
    lock_path = path + LOCK_SUFFIX
    try:
        lock_fd = ops.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreError(f"{lock_path}: cannot open the lock file: {exc.strerror}") from exc
    deadline = time.monotonic() + max(lock_timeout, 5.0)
    while not ops.try_lock(lock_fd):
        if time.monotonic() >= deadline:
            ops.close(lock_fd)
            raise FileLockedError(path, "its sharers' append lock stayed held")
        time.sleep(0.005)
    return lock_fd


def _same_file(st: os.stat_result, path: str, ops: FileOps) -> bool:
    try:
        now = ops.stat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _remove_leftover(path: str, ops: FileOps) -> None:
    """Remove the temporary file of an interrupted rewrite, unless a live rewrite (a sharer's) holds it."""
    try:
        fd = ops.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        if not ops.try_lock(fd):
            return
        ops.unlink(path)
    finally:
        ops.close(fd)
    logger.info("removed %s, left over from an interrupted rewrite", path)


def _initialise(path: str, fd: int, ops: FileOps, size: int) -> int:
    """Write the header into a new or empty file and make the file's existence durable."""
    header = fmt.encode_file_header()
    if size:
        ops.ftruncate(fd, 0)
    write_all(ops, fd, header)
    ops.fsync(fd)
    ops.fsync_dir(path)
    return len(header)


def _load(path: str, fd: int, size: int, ops: FileOps, apply: fmt.Apply) -> int:
    data = ops.read_all(fd, size)
    try:
        with memoryview(data) as view:
            try:
                fmt.check_file_header(view)
            except fmt.HeaderError as exc:
                if not exc.torn:
                    raise CorruptFileError(path, 0, exc.reason) from None
                torn_header = True
            else:
                torn_header = False
                end, damage = fmt.replay(view, fmt.FILE_HEADER_SIZE, apply)
    finally:
        if isinstance(data, mmap.mmap):
            data.close()
    if torn_header:
        logger.warning("%s: incomplete file header (%d bytes) from an interrupted creation; starting the file anew",
                       path, size)
        return _initialise(path, fd, ops, size)
    if damage is not None:
        if damage.fatal or damage.next_valid is not None:
            where = "" if damage.next_valid is None else f" (a valid record follows at {damage.next_valid})"
            raise CorruptFileError(path, damage.offset, damage.reason + where)
        logger.warning("%s: torn tail at byte offset %d (%s): dropping %d bytes", path, end, damage.reason,
                       size - end)
        ops.ftruncate(fd, end)
        ops.fsync(fd)
    return end
