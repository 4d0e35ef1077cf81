"""The operator tools behind `python -m buntsession`: check, stats, dump, repair and shrink a data file.

`check`, `stats` and `dump` only read, without the lock, so they work on a live file (at worst they see a
record being written as a torn tail). `repair` and `shrink` take the file's lock and refuse a file that a
running process holds.
"""

from __future__ import annotations

import base64
import json
import mmap
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

import anyio

from buntsession.engine import DB
from buntsession.engine import format as fmt
from buntsession.engine.log import FileOps, write_all
from buntsession.errors import FileLockedError

EX_OK, EX_TORN, EX_DAMAGED = 0, 1, 2
EX_USAGE, EX_NOINPUT, EX_TEMPFAIL = 64, 66, 75

_OPS = FileOps()  # the engine's own file calls: the same lock, the same writes, the same directory fsync


class ToolError(Exception):
    """Ends a command with `status` after printing the message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Scan:
    """What a read of the whole file found."""

    path: str
    size: int
    records: int = 0
    state: dict[str, tuple[bytes, float | None]] = field(default_factory=dict)
    kept: list[tuple[int, int]] = field(default_factory=list)
    """Byte ranges of the valid records, merged where they touch."""
    torn_bytes: int = 0
    damage: fmt.Damage | None = None
    """The first damage (an invalid stretch that a valid record follows, or an unusable record)."""
    damaged_stretches: int = 0
    header_error: str | None = None

    def live(self, now: float) -> dict[str, tuple[bytes, float | None]]:
        return {k: e for k, e in self.state.items() if e[1] is None or e[1] > now}

    @property
    def status(self) -> int:
        if self.header_error is not None or self.damage is not None:
            return EX_DAMAGED
        return EX_TORN if self.torn_bytes else EX_OK


class Progress:
    """A percentage on stderr when it is a terminal; nothing when it is piped."""

    def __init__(self, label: str, total: int, stream: IO[str] = sys.stderr) -> None:
        self.label, self.total, self.stream = label, max(total, 1), stream
        self.enabled = stream.isatty() and total > 4 * 1024 * 1024
        self.shown = -1

    def update(self, done: int) -> None:
        if self.enabled and (percent := done * 100 // self.total) != self.shown:
            self.shown = percent
            self.stream.write(f"\r{self.label}: {percent}%")
            self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * (len(self.label) + 6) + "\r")
            self.stream.flush()


def _open(path: str) -> int:
    """A read-only descriptor of an existing file; ToolError(66) when there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ToolError(EX_NOINPUT, f"{path}: no such file") from None
    if not os.path.isfile(path):
        os.close(fd)
        raise ToolError(EX_NOINPUT, f"{path}: not a regular file")
    return fd


@contextmanager
def mapped(path: str) -> Iterator[memoryview]:
    """The file's bytes, read-only and mapped, without taking its lock."""
    fd = _open(path)
    try:
        size = os.fstat(fd).st_size
        data: bytes | mmap.mmap = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else b""
    finally:
        os.close(fd)
    try:
        with memoryview(data) as view:
            yield view
    finally:
        if isinstance(data, mmap.mmap):
            data.close()


def scan(path: str, view: memoryview, label: str = "reading") -> Scan:
    result = Scan(path, len(view))
    try:
        fmt.check_file_header(view)
    except fmt.HeaderError as exc:
        result.header_error = exc.reason
        return result
    progress = Progress(label, len(view))
    state = result.state
    for item in fmt.walk(view):
        if isinstance(item, fmt.Record):
            result.records += 1
            if result.kept and result.kept[-1][1] == item.offset:
                result.kept[-1] = (result.kept[-1][0], item.end)
            else:
                result.kept.append((item.offset, item.end))
            if item.rtype == fmt.SET:
                state[item.key] = (item.value, item.expire_at)
            elif item.rtype == fmt.DEL:
                state.pop(item.key, None)
            elif item.key in state:
                state[item.key] = (state[item.key][0], item.expire_at)
            if result.records % 10_000 == 0:
                progress.update(item.end)
        elif item.next_valid is None and not item.fatal:
            result.torn_bytes = len(view) - item.offset
        else:
            result.damaged_stretches += 1
            result.damage = result.damage or item
    progress.finish()
    return result


# -- the commands ----------------------------------------------------------------------------------------------


def check(path: str, out: IO[str]) -> int:
    with mapped(path) as view:
        found = scan(path, view, "checking")
    if found.header_error is not None:
        out.write(f"{path}: damaged at byte offset 0: {found.header_error}\n")
        return EX_DAMAGED
    live = found.live(time.time())
    out.write(f"{path}: {found.size} bytes, {found.records} records, {len(live)} live keys, "
              f"{len(found.state) - len(live)} expired keys, {found.torn_bytes} torn-tail bytes\n")
    if found.damage is not None:
        out.write(f"first damage at byte offset {found.damage.offset}: {found.damage.reason} "
                  f"({found.damaged_stretches} damaged stretch{'es' if found.damaged_stretches > 1 else ''})\n")
    elif found.torn_bytes:
        out.write("torn tail only: the next open cuts it off\n")
    else:
        out.write("clean\n")
    return found.status


def stats(path: str, out: IO[str], as_json: bool = False) -> int:
    with mapped(path) as view:
        found = scan(path, view, "reading")
    if found.header_error is not None:
        raise ToolError(EX_DAMAGED, f"{path}: damaged at byte offset 0: {found.header_error}")
    now = time.time()
    live = found.live(now)
    live_bytes = fmt.FILE_HEADER_SIZE + sum(fmt.RECORD_HEADER_SIZE + len(k.encode()) + len(v) for k, (v, _) in
                                            live.items())
    left = sorted(e - now for _, e in live.values() if e is not None)
    report: dict[str, Any] = {
        "file": path, "file_size": found.size, "records": found.records, "keys": len(live),
        "expired": len(found.state) - len(live), "live_size": live_bytes,
        "no_expiry": len(live) - len(left),
        "expires_in": None if not left else {
            "min": left[0], "median": statistics.median(left), "max": left[-1]},
    }
    if as_json:
        out.write(json.dumps(report) + "\n")
        return EX_OK
    ratio = found.size / live_bytes if live_bytes else 0.0
    out.write(f"{path}\n  keys: {len(live)} live, {report['expired']} expired, {found.records} records\n"
              f"  size: {found.size} bytes in the file, {live_bytes} live ({ratio:.1f}x)\n")
    if left:
        out.write(f"  expiry: {report['no_expiry']} keys never expire; the others in "
                  f"{_duration(left[0])} (first), {_duration(statistics.median(left))} (median), "
                  f"{_duration(left[-1])} (last)\n")
    else:
        out.write(f"  expiry: {report['no_expiry']} keys never expire\n")
    return EX_OK


def dump(path: str, out: IO[str]) -> int:
    with mapped(path) as view:
        found = scan(path, view, "dumping")
    if found.header_error is not None:
        raise ToolError(EX_DAMAGED, f"{path}: damaged at byte offset 0: {found.header_error}")
    for key, (value, expire_at) in found.live(time.time()).items():
        out.write(json.dumps({"key": key, "value": base64.b64encode(value).decode("ascii"),
                              "expire_at": expire_at}) + "\n")
    if found.damage is not None:
        sys.stderr.write(f"{path}: damaged at byte offset {found.damage.offset}; dumped the valid records\n")
        return EX_DAMAGED
    return EX_OK


def repair(path: str, out: IO[str]) -> int:
    """Keep every valid record; replace the file atomically; keep the original as FILE.corrupt-<time>."""
    with _locked(path), mapped(path) as view:
        found = scan(path, view, "repairing")
        if found.header_error is not None:
            raise ToolError(EX_DAMAGED, f"{path}: {found.header_error}: not repairing a file it cannot read")
        if found.status == EX_OK:
            out.write(f"{path}: clean, nothing to repair\n")
            return EX_OK
        aside = f"{path}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        tmp = path + ".repair"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            kept = write_all(_OPS, fd, fmt.encode_file_header())
            kept += sum(write_all(_OPS, fd, view[a:b]) for a, b in found.kept)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(path, aside)  # the original stays whole under its new name; the path never goes missing
        os.replace(tmp, path)
        _OPS.fsync_dir(os.path.abspath(path))
    out.write(f"{path}: kept {found.records} records ({kept} bytes), dropped {found.size - kept} bytes; "
              f"the original is {aside}\n")
    return EX_OK


def shrink(path: str, out: IO[str]) -> int:
    with mapped(path):
        pass  # a missing file is an error here, not a new file
    before = os.path.getsize(path)

    async def run() -> None:
        async with DB(path, autoshrink=False) as db:
            await db.shrink()

    try:
        anyio.run(run)
    except FileLockedError:
        raise ToolError(EX_TEMPFAIL, f"{path}: held by a running process; stop it first") from None
    out.write(f"{path}: {before} -> {os.path.getsize(path)} bytes\n")
    return EX_OK


# -- helpers ------------------------------------------------------------------------------------------------


@contextmanager
def _locked(path: str) -> Iterator[None]:
    """Hold the file's lock, as a DB would: ToolError(75) when a running process holds it."""
    fd = _open(path)
    try:
        if not _OPS.try_lock(fd):
            raise ToolError(EX_TEMPFAIL, f"{path}: held by a running process; stop it first")
        yield
    finally:
        os.close(fd)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(seconds) >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


COMMANDS: dict[str, Callable[..., int]] = {"check": check, "stats": stats, "dump": dump, "repair": repair,
                                           "shrink": shrink}
