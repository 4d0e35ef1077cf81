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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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


@contextmanager
def mapped_file(ops: FileOps, fd: int, size: int) -> Iterator[memoryview]:
    """The first `size` bytes of the file, mapped read-only (copied where mapping is not possible): the one
    way the engine and the operator tools read a whole data file."""
    data = ops.read_all(fd, size)
    try:
        with memoryview(data) as view:
            yield view
    finally:
        if isinstance(data, mmap.mmap):
            data.close()


class AppendFailed(Exception):
    """An append did not complete. The caller must call `truncate_to_end` off the event loop."""


class Superseded(Exception):
    """Another process rewrote the shared file first: this rewrite gave up, and the file must be reloaded."""


class AppendLog:
    """One open data file. The owner serialises `append`, `truncate_to_end` and the end of `rewrite`."""

    def __init__(self, path: str, fd: int, end: int, ops: FileOps, lock_fd: int | None = None,
                 header: fmt.FileHeader | None = None) -> None:
        self.path = path
        self.fd = fd
        self.header = header or fmt.new_file_header()
        """The file's header: its version and salt, which appends and rewrites keep."""
        self.salt = self.header.salt
        st = ops.fstat(fd)
        self.inode, self.dev = st.st_ino, st.st_dev
        self.rewriting: Rewrite | None = None
        """The rewrite in progress, if any (see rewrite_begin)."""
        self.generation = 0
        """Counts the moves to another file (a rewrite's swap, a sharer's newer file): unlike an inode
        number, which a new file may reuse once the old one is gone, it never repeats."""
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
        self._write = ops.write  # the one call of every append: looked up once
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
                    end, header = _initialise(path, fd, ops, size)
                else:
                    end, header = _load(path, fd, size, ops, apply)
            except BaseException:
                ops.close(fd)
                raise
        except BaseException:
            if lock_fd is not None:
                ops.close(lock_fd)
            raise
        if lock_fd is not None:
            ops.unlock(lock_fd)
        return cls(path, fd, end, ops, lock_fd, header)

    # -- writing -----------------------------------------------------------------------------------------

    def append(self, data: bytes) -> None:
        """Write one record (or batch) with one write call. Raises AppendFailed, leaving `end` unchanged.

        `DB._solo_step` (the fast path of `DB.set` and `DB.update`) inlines this (the write call through
        `_write`, then `end` and `written` moved by what it wrote, or `failure`): keep them in step."""
        try:
            n = self._write(self.fd, data)
        except OSError as exc:
            raise self.failure(data, exc) from exc
        if n != len(data):
            raise self.failure(data, n)
        self.end += n
        self.written += n

    def failure(self, data: bytes, result: int | OSError) -> AppendFailed:
        """The AppendFailed for an append of `data` whose write call returned or raised `result`."""
        if isinstance(result, OSError):
            failed = AppendFailed(f"write to {self.path} failed: {result}")
            failed.__cause__ = result
            return failed
        return AppendFailed(f"short write to {self.path}: {result} of {len(data)} bytes (out of space?)")

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
        rw = self.rewriting
        if rw is not None:
            # A rewrite whose owner never finished nor aborted it: its descriptors would keep the file's
            # lock (a dup shares it) after this close.
            self.rewrite_abort(rw)
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

    def replaced(self) -> bool:
        return not _same_file(self._ops.fstat(self.fd), self.path, self._ops)

    def look(self) -> int | None:
        """For a sharer: one stat of the path. None when the path no longer names our file (a sharer's
        rewrite replaced it, or it was deleted); else the bytes the file has past our end (0: none).

        (Not an fstat of our descriptor and its link count: a file with a second name, a hard-link backup,
        keeps a name after a rewrite replaced it at the path.)"""
        try:
            st = self._ops.stat(self.path)
        except FileNotFoundError:
            return None
        if st.st_ino != self.inode or st.st_dev != self.dev:
            return None
        return st.st_size - self.end

    def apply_appended(self, size: int, apply: fmt.Apply, holding_append_lock: bool) -> int | None:
        """Read the `size` bytes past our end (what `look` found) with one pread and apply their complete
        records: `apply_new`, which says what its result means."""
        return self.apply_new(self.end, self._ops.pread(self.fd, size, self.end), apply, holding_append_lock)

    def read_new(self) -> tuple[tuple[int, int], bytes]:
        """((our generation, our end), the bytes after it): what other processes appended. Blocking."""
        with self.sync_lock:  # a switch to another file holds it: read one file, and say which
            start, inode = self.end, self.generation
            size = self._ops.fstat(self.fd).st_size
            return (inode, start), (self._ops.pread(self.fd, size - start, start) if size > start else b"")

    def apply_new(self, at: tuple[int, int] | int, fresh: bytes, apply: fmt.Apply,
                  holding_append_lock: bool) -> int | None:
        """Apply the complete records in `fresh` (the file's bytes from `start`, our end) and move our end.

        An incomplete record at the end is one being written, and stops the catch-up before it; but to a
        caller holding the append lock no one is writing: it is what a killed writer left, and this returns
        the file's size so that the caller cuts it off (`cut_tail`, off the loop). Otherwise None.
        """
        if isinstance(at, tuple):
            generation, start = at
            if generation != self.generation:
                return None  # moved to another file meanwhile: these bytes are of the old one
        else:
            start = at
        if start != self.end:
            return None  # someone else caught up meanwhile: these bytes are applied already
        with memoryview(fresh) as view:
            done, damage = fmt.replay(view, 0, apply, self.salt)
        if damage is not None and damage.corrupt:
            raise CorruptFileError(self.path, self.end + damage.offset, damage.reason)
        self.end += done
        if damage is not None and holding_append_lock:
            return start + len(fresh)
        return None

    def complete_new(self) -> bytes:
        """The complete records after our end (our end stays: the caller applies them, or gives them to
        `rewrite_finish`). Blocking; the caller holds the append lock, so an incomplete record is a dead
        writer's."""
        (_, start), fresh = self.read_new()
        if not fresh:
            return b""
        with memoryview(fresh) as view:
            done, damage = fmt.replay(view, 0, _ignore, self.salt)
        if damage is not None and damage.corrupt:
            raise CorruptFileError(self.path, start + damage.offset, damage.reason)
        return fresh[:done]

    def cut_tail(self, size: int) -> None:
        """Cut what a writer that died left after the last complete record. Blocking; hold the append lock."""
        if self._ops.fstat(self.fd).st_size != size:
            return  # not ours to judge any more
        logger.warning("%s: torn tail at byte offset %d, left by a process that died writing: dropping %d bytes",
                       self.path, self.end, size - self.end)
        self._ops.ftruncate(self.fd, self.end)

    def load_replacement(self, apply: fmt.Apply) -> Replacement:
        """Open and replay the file another process's rewrite put at the path. Blocking. The caller installs
        the index it built and then `switch`es to the file, or `discard`s it."""
        ops = self._ops
        fd = ops.open(self.path, os.O_RDWR | os.O_APPEND)
        try:
            if not ops.try_lock(fd, shared=True):
                raise FileLockedError(self.path, "an exclusive owner took the file over")
            st = ops.fstat(fd)
            with mapped_file(ops, fd, st.st_size) as view:
                try:
                    header = fmt.check_file_header(view)
                except fmt.HeaderError as exc:
                    raise CorruptFileError(self.path, 0, exc.reason) from None
                end, damage = fmt.replay(view, header.size, apply, header.salt)
            if damage is not None and damage.corrupt:
                raise CorruptFileError(self.path, damage.offset, damage.reason)
        except BaseException:
            ops.close(fd)
            raise
        return Replacement(fd, end, st.st_ino, st.st_dev, st.st_size, header)

    def switch(self, new: Replacement) -> None:
        """Move to a loaded replacement file (its index is already in place)."""
        with self.sync_lock:
            old, self.fd, self.end, self.inode, self.dev = self.fd, new.fd, new.end, new.inode, new.dev
            self.header, self.salt = new.header, new.header.salt
            self.generation += 1
            self.synced = self.written  # what we wrote is in the new file, which its writer fsynced
            self._ops.close(old)

    def discard(self, new: Replacement) -> None:
        self._ops.close(new.fd)

    # -- rewriting ---------------------------------------------------------------------------------------
    #
    # A rewrite runs in phases, so that its owner can take the snapshot and close its write gate on the
    # event loop while every blocking step runs in a worker thread:
    #
    #   rewrite_begin (thread)   lock and empty the temporary file, write the file header
    #   rewrite_write (thread)   append snapshot chunks that the owner encoded
    #   rewrite_tail (thread)    copy what was appended since the snapshot, fsync the temporary file
    #   rewrite_finish (thread, the owner's writes held)   copy the last bytes, fsync, rename, swap, dir fsync
    #
    # A crash at any point leaves the whole old or the whole new file at the path.

    def rewrite_begin(self, start: int, restore: bool = False, generation: int | None = None) -> Rewrite:
        """Start a rewrite of the file as it was at byte `start` (where the owner takes its snapshot).

        Raises Superseded when a sharer is rewriting the file right now, or when this log no longer holds
        the file of `generation` (the one the owner took its snapshot of: in shared mode a read may have
        moved the log to a sharer's newer file meanwhile). With `restore`, the data file is known to be gone from
        its path: the rewrite puts the live set back there. Blocking.
        """
        if generation is None:
            generation = self.generation
        ops = self._ops
        tmp = self.path + REWRITE_SUFFIX
        while True:
            fd = ops.open(tmp, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            if not ops.try_lock(fd):  # a sharer is rewriting the file right now: leave it to them
                ops.close(fd)
                raise Superseded(self.path)
            if _same_file(ops.fstat(fd), tmp, ops):
                break
            # A sharer that gave up its own rewrite removed the file between our open and our lock: what we
            # hold has no name any more, and could never be renamed into place. Open the path again.
            ops.close(fd)
        try:
            ops.ftruncate(fd, 0)
            size = write_all(ops, fd, self.header.encode())  # the same version and salt: the tail is copied
            # The rewrite copies the tail from a descriptor of its own: in shared mode a read may move this
            # log to a file another sharer's rewrite put at the path (and close the old descriptor) meanwhile.
            with self.sync_lock:  # a switch to another file holds it
                if self.generation != generation:
                    raise Superseded(self.path)
                src = os.dup(self.fd)
        except BaseException:
            ops.close(fd)
            _remove_leftover(tmp, ops)
            raise
        rw = Rewrite(fd, tmp, start, start, size, restore, src, generation)
        self.rewriting = rw  # close() drops it, whatever became of its owner (a cancelled task)
        return rw

    def rewrite_write(self, rw: Rewrite, chunk: bytes) -> None:
        """Append one chunk of the snapshot. Blocking."""
        rw.size += write_all(self._ops, rw.fd, chunk)

    def rewrite_tail(self, rw: Rewrite) -> None:
        """Copy the records appended since the snapshot (without holding any writer), then fsync. Blocking."""
        ops = self._ops
        ops.phase("snapshot")
        if self.generation != rw.generation:
            raise Superseded(self.path)
        rw.copied = self._copy(rw.fd, rw.copied, self.end, rw.src)
        ops.phase("tail")
        ops.fsync(rw.fd)
        ops.phase("fsync")

    def rewrite_finish(self, rw: Rewrite, upto: int = 0) -> int:
        """Copy the last records, fsync, and put the new file at the path. The owner holds its writers (and,
        shared, the sharers' append lock). Returns the new file's size. Blocking; OSError, Superseded."""
        ops = self._ops
        renamed = False
        try:
            with self.sync_lock:
                if self.generation != rw.generation:
                    raise Superseded(self.path)  # moved to a sharer's newer file since the snapshot
                if rw.restore:
                    if _exists(self.path, ops):
                        raise OSError(errno.EEXIST, "another file appeared at the data file's path", self.path)
                elif not _same_file(ops.fstat(self.fd), self.path, ops):
                    raise Superseded(self.path)
                upto = max(upto, self.end)  # shared: also the others' records after our end (`complete_new`)
                if upto > rw.copied:
                    rw.copied = self._copy(rw.fd, rw.copied, upto, rw.src)
                    ops.fsync(rw.fd)
                size = rw.size + rw.copied - rw.start
                if not ops.try_lock(rw.fd, shared=self.lock_fd is not None):
                    raise OSError(errno.EAGAIN, "could not lock the rewritten file", rw.tmp)
                ops.replace(rw.tmp, self.path)
                renamed = True
                # From here on the path names the new file: swap to it whatever happens next, or
                # writes would go to a file that is no longer linked.
                st = ops.fstat(rw.fd)
                old, self.fd, self.end, self.inode, self.dev = self.fd, rw.fd, size, st.st_ino, st.st_dev
                self.generation += 1
                rw.fd = -1
                self.synced = self.written
                ops.close(old)
                self._close_src(rw)
                self.rewriting = None
                ops.phase("rename")
                ops.fsync_dir(self.path)
                ops.phase("dirsync")
            return size
        except BaseException as exc:
            if not renamed:
                self.rewrite_abort(rw)
            elif isinstance(exc, OSError):
                self.failed = exc  # the new file is in place, but its directory entry may not be durable
            raise

    def rewrite_abort(self, rw: Rewrite) -> None:
        """Drop the temporary file of a rewrite that will not finish. Blocking."""
        if self.rewriting is rw:
            self.rewriting = None
        self._close_src(rw)
        if rw.fd >= 0:
            fd, rw.fd = rw.fd, -1
            self._ops.close(fd)
            _remove_leftover(rw.tmp, self._ops)

    def _close_src(self, rw: Rewrite) -> None:
        if rw.src >= 0:
            src, rw.src = rw.src, -1
            os.close(src)

    def unlinked(self) -> bool:
        """Whether the data file was deleted under us: the open file has no name left (one fstat) and no
        file is at the path (a sharer's rewrite also leaves our old file nameless, with a new one there)."""
        return self.fd >= 0 and self._ops.fstat(self.fd).st_nlink == 0 and not _exists(self.path, self._ops)

    def _copy(self, dst: int, begin: int, end: int, src: int) -> int:
        pos = begin
        while pos < end:
            chunk = self._ops.pread(src, min(_COPY_CHUNK, end - pos), pos)
            if not chunk:
                raise OSError(errno.EIO, "data file shorter than its records", self.path)
            write_all(self._ops, dst, chunk)
            pos += len(chunk)
        return pos


@dataclass
class Replacement:
    """A data file another sharer's rewrite put at the path, loaded but not yet switched to."""

    fd: int
    end: int
    inode: int
    dev: int
    size: int
    header: fmt.FileHeader


@dataclass
class Rewrite:
    """A rewrite in progress (see AppendLog.rewrite_begin)."""

    fd: int
    tmp: str
    start: int
    """End of the data file when the snapshot was taken: the tail copy starts here."""
    copied: int
    """End of the data file's bytes copied so far."""
    size: int
    """Bytes written to the temporary file: header and snapshot."""
    restore: bool
    """The data file was deleted under its owner: the rewrite puts the live set back at the path."""
    src: int
    """A descriptor of the file being rewritten, for the tail copy."""
    generation: int
    """The log's generation then: a log that moved to another file since gives the rewrite up (Superseded)."""


def _ignore(rtype: int, key: str, value: bytes, expire_at: float | None) -> None:
    pass


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


def _exists(path: str, ops: FileOps) -> bool:
    try:
        ops.stat(path)
    except FileNotFoundError:
        return False
    return True


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


def _initialise(path: str, fd: int, ops: FileOps, size: int) -> tuple[int, fmt.FileHeader]:
    """Write the header into a new or empty file and make the file's existence durable."""
    header = fmt.new_file_header()
    if size:
        ops.ftruncate(fd, 0)
    write_all(ops, fd, header.encode())
    ops.fsync(fd)
    ops.fsync_dir(path)
    return header.size, header


def _load(path: str, fd: int, size: int, ops: FileOps, apply: fmt.Apply) -> tuple[int, fmt.FileHeader]:
    with mapped_file(ops, fd, size) as view:
        try:
            header = fmt.check_file_header(view)
        except fmt.HeaderError as exc:
            if not exc.torn:
                raise CorruptFileError(path, 0, exc.reason) from None
            torn_header = True
        else:
            torn_header = False
            end, damage = fmt.replay(view, header.size, apply, header.salt)
    if torn_header:
        logger.warning("%s: incomplete file header (%d bytes) from an interrupted creation; starting the file anew",
                       path, size)
        return _initialise(path, fd, ops, size)
    if damage is not None:
        if damage.corrupt:
            where = "" if damage.next_valid is None else f" (a valid record follows at {damage.next_valid})"
            raise CorruptFileError(path, damage.offset, damage.reason + where)
        logger.warning("%s: torn tail at byte offset %d (%s): dropping %d bytes", path, end, damage.reason,
                       size - end)
        ops.ftruncate(fd, end)
        ops.fsync(fd)
    return end, header
