"""Offline access to a data file, for the operator tools: read it as `DB` loads it, repair it, shrink it.

`scan_file` reads without the lock, so it works on a live file (at worst it sees a record being written as a
torn tail). It uses the same record rules as `DB`'s open (`format.walk` and `index.apply_record`), so what
`check`, `stats` and `dump` report never drifts from what a DB would load.

`repair_file` and `shrink_file` take the file's lock and refuse a file that a running process holds.

A repair keeps every valid record. A key whose last valid record comes before damaged bytes may have had a
later record in them: a DEL (a logged-out session), or a newer value. Bringing such a key back as it was
would undo a deletion silently, so by default a repair also appends a DEL record for each of these
"suspect" keys (the session ends; its owner logs in again), and says how many it ended; with
`keep_suspect=True` they stay as their last valid record left them, and the report names them.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from buntsession.engine import format as fmt
from buntsession.engine.db import DB
from buntsession.engine.index import Entry, apply_record, live_size
from buntsession.engine.log import AppendLog, FileOps, mapped_file
from buntsession.errors import FileLockedError

__all__ = ["FileProblem", "FileScan", "RepairReport", "repair_file", "scan_file", "shrink_file"]

_OPS = FileOps()  # the engine's own file calls: the same lock, the same writes, the same directory fsync


class FileProblem(Exception):
    """The path cannot be read as a data file at all: `kind` is "missing", "unreadable" or "not a file"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class FileScan:
    """What a read of the whole file found, by the rules `DB` loads it with."""

    path: str
    size: int
    records: int = 0
    state: dict[str, Entry] = field(default_factory=dict)
    """Every key's entry after the valid records, expired ones included (see `live`)."""
    last_record: dict[str, int] = field(default_factory=dict)
    """Offset of each key's last valid record."""
    torn_bytes: int = 0
    """Bytes after the last valid record that no valid record follows: what open cuts off."""
    damage: fmt.Damage | None = None
    """The first damage (an invalid stretch that a valid record follows, or an unusable record)."""
    damaged_stretches: int = 0
    last_damage: int | None = None
    """Offset where the last damaged stretch starts."""
    header_error: str | None = None
    """The file is not a buntsession data file this version reads (open raises CorruptFileError)."""
    header_size: int = 0
    """Bytes of the file header (0 when there is no valid one)."""
    new_file: bool = False
    """Empty, or an incomplete header from an interrupted creation: open starts such a file anew."""

    def live(self, now: float) -> dict[str, Entry]:
        return {k: e for k, e in self.state.items() if e[1] is None or e[1] > now}

    def live_size(self, now: float) -> int:
        return live_size(self.state, now)

    def suspect(self, now: float) -> list[str]:
        """Live keys whose last valid record precedes damaged bytes, which may have held a later record."""
        if self.last_damage is None:
            return []
        return sorted(k for k in self.live(now) if self.last_record[k] < self.last_damage)


def _open_readable(path: str) -> int:
    """A read-only descriptor of an existing regular file, checked before it is opened (a FIFO would
    block the open) and after (the path may have changed in between)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileProblem("missing", f"{path}: no such file") from None
    except OSError as exc:
        raise FileProblem("unreadable", f"{path}: cannot read it: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FileProblem("not a file", f"{path}: not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileProblem("missing", f"{path}: no such file") from None
    except OSError as exc:
        raise FileProblem("unreadable", f"{path}: cannot read it: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileProblem("not a file", f"{path}: not a regular file")
    return fd


def _scan(path: str, view: memoryview, progress: Callable[[int], None] | None) -> FileScan:
    result = FileScan(path, len(view))
    try:
        header = fmt.check_file_header(view)
    except fmt.HeaderError as exc:
        if exc.torn:
            result.new_file = True
            result.torn_bytes = len(view)
        else:
            result.header_error = exc.reason
        return result
    result.header_size = header.size
    state, last = result.state, result.last_record
    for item in fmt.walk(view, header.size, header.salt):
        if isinstance(item, fmt.Record):
            result.records += 1
            apply_record(state, item.rtype, item.key, item.value, item.expire_at)
            last[item.key] = item.offset
            if progress is not None and result.records % 10_000 == 0:
                progress(item.end)
        elif not item.corrupt:
            result.torn_bytes = len(view) - item.offset
        else:
            result.damaged_stretches += 1
            result.damage = result.damage or item
            result.last_damage = item.offset
    return result


def scan_file(path: str, progress: Callable[[int], None] | None = None) -> FileScan:
    """Read the whole file without its lock, as `DB` would load it. `progress` gets byte offsets now and
    then. Raises FileProblem when the path is missing, unreadable or not a regular file."""
    fd = _open_readable(path)
    try:
        with mapped_file(_OPS, fd, os.fstat(fd).st_size) as view:
            return _scan(path, view, progress)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class RepairReport:
    scan: FileScan
    kept_records: int
    kept_bytes: int
    """Bytes of the valid records kept (the header, and the DELs added, aside)."""
    ended: list[str]
    """Suspect keys ended by a DEL record (empty with keep_suspect)."""
    suspect: list[str]
    size: int
    aside: str


def _hold(path: str) -> AppendLog:
    """The file opened read-write under its lock, as a DB holds it (without loading it). FileLockedError when
    a running process holds it. Closing the returned log releases the lock."""
    os.close(_open_readable(path))
    try:
        fd = _OPS.open(path, os.O_RDWR | os.O_APPEND | os.O_NONBLOCK)
    except OSError as exc:
        raise FileProblem("unreadable", f"{path}: cannot open it for writing: {exc.strerror}") from None
    try:
        if not _OPS.try_lock(fd):
            raise FileLockedError(path, "held by a running process; stop it first")
        return AppendLog(path, fd, _OPS.fstat(fd).st_size, _OPS)
    except BaseException:
        _OPS.close(fd)
        raise


def _aside_name(path: str) -> str:
    """FILE.corrupt-<UTC time>, with a counter when that name is taken (two repairs in one second)."""
    base = f"{path}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    name, n = base, 1
    while os.path.lexists(name):
        n += 1
        name = f"{base}-{n}"
    return name


def repair_file(path: str, *, keep_suspect: bool = False, progress: Callable[[int], None] | None = None,
                now: float | None = None) -> RepairReport | FileScan:
    """Replace a damaged file with one that holds every valid record (and, unless `keep_suspect`, a DEL for
    each suspect key), atomically, through the engine's own rewrite (a `.rewrite` file that open cleans up).
    The original stays whole as FILE.corrupt-<time>. Returns the scan alone when there is nothing to repair
    (no damage, no torn tail) or when the header is not a buntsession one (nothing to keep).
    Raises FileProblem, FileLockedError."""
    path = os.path.realpath(path)
    log = _hold(path)
    try:
        with mapped_file(_OPS, log.fd, log.end) as view:
            found = _scan(path, view, progress)
            if found.header_error is not None or found.new_file or (found.damage is None and not found.torn_bytes):
                return found  # nothing to repair, or nothing to keep (open starts a new file anew)
            suspect = found.suspect(time.time() if now is None else now)
            ended = [] if keep_suspect else suspect
            header = fmt.check_file_header(view)
            log.header, log.salt = header, header.salt  # the new file keeps the version and the salt
            rw = log.rewrite_begin(log.end)
            try:
                kept = kept_bytes = 0
                chunk: list[bytes] = []
                for item in fmt.walk(view, header.size, header.salt):
                    if isinstance(item, fmt.Record):
                        chunk.append(bytes(view[item.offset : item.end]))
                        kept += 1
                        kept_bytes += item.end - item.offset
                        if len(chunk) >= 1000:
                            log.rewrite_write(rw, b"".join(chunk))
                            chunk = []
                chunk.extend(fmt.encode_record(fmt.DEL, key.encode(), b"", None, header.salt) for key in ended)
                if chunk:
                    log.rewrite_write(rw, b"".join(chunk))
                log.rewrite_tail(rw)
                aside = _aside_name(path)
                os.link(path, aside)  # the original stays whole under its new name; the path never goes missing
                size = log.rewrite_finish(rw)
            except BaseException:
                log.rewrite_abort(rw)
                raise
    finally:
        log.close()
    return RepairReport(found, kept, kept_bytes, ended, suspect, size, aside)


def shrink_file(path: str) -> tuple[int, int]:
    """Rewrite the file to its live set, as `DB.shrink` does. Returns (size before, size after).
    Raises FileProblem, FileLockedError, CorruptFileError."""
    os.close(_open_readable(path))
    before = os.path.getsize(path)

    async def run() -> None:
        async with DB(path, autoshrink=False) as db:
            await db.shrink()

    anyio.run(run)
    return before, os.path.getsize(path)
