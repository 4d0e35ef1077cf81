"""The operator tools behind `python -m buntsession`: check, stats, dump, repair and shrink a data file.

The reading and the writing are the engine's (`buntsession.engine.offline`): this module keeps only the
output and the exit statuses. `check`, `stats` and `dump` only read, without the lock, so they work on a
live file. `repair` and `shrink` take the file's lock and refuse a file that a running process holds.
Every failure is one line on stderr and a documented exit status, never a traceback.
"""

from __future__ import annotations

import base64
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from buntsession.engine.offline import FileProblem, FileScan, repair_file, scan_file, shrink_file
from buntsession.errors import CorruptFileError, FileLockedError, StoreError

EX_OK, EX_TORN, EX_DAMAGED = 0, 1, 2
EX_USAGE, EX_NOINPUT, EX_TEMPFAIL = 64, 66, 75


class ToolError(Exception):
    """Ends a command with `status` after printing the message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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


def _status(found: FileScan) -> int:
    if found.header_error is not None or found.damage is not None:
        return EX_DAMAGED
    return EX_TORN if found.torn_bytes else EX_OK


def _read(path: str, label: str) -> FileScan:
    progress = Progress(label, _size(path))
    try:
        return scan_file(path, progress.update)
    except FileProblem as exc:
        raise ToolError(EX_NOINPUT, str(exc)) from None
    finally:
        progress.finish()


def _readable(path: str, label: str) -> FileScan:
    found = _read(path, label)
    if found.header_error is not None:
        raise ToolError(EX_DAMAGED, f"{path}: damaged at byte offset 0: {found.header_error}")
    return found


# -- the commands ----------------------------------------------------------------------------------------------


def check(path: str, out: IO[str]) -> int:
    found = _read(path, "checking")
    if found.header_error is not None:
        out.write(f"{path}: damaged at byte offset 0: {found.header_error}\n")
        return EX_DAMAGED
    if found.new_file:
        if found.size == 0:
            out.write(f"{path}: 0 bytes, an empty file: the next open makes it a new data file\nclean\n")
            return EX_OK
        out.write(f"{path}: {found.size} bytes, an incomplete file header (an interrupted creation), "
                  f"{found.torn_bytes} torn-tail bytes\ntorn tail only: the next open starts the file anew\n")
        return EX_TORN
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
    return _status(found)


def stats(path: str, out: IO[str], as_json: bool = False) -> int:
    found = _readable(path, "reading")
    now = time.time()
    live = found.live(now)
    live_bytes = found.live_size(now)
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
    found = _readable(path, "dumping")
    for key, (value, expire_at) in found.live(time.time()).items():
        out.write(json.dumps({"key": key, "value": base64.b64encode(value).decode("ascii"),
                              "expire_at": expire_at}) + "\n")
    if found.damage is not None:
        sys.stderr.write(f"{path}: damaged at byte offset {found.damage.offset}; dumped the valid records\n")
        return EX_DAMAGED
    return EX_OK


def repair(path: str, out: IO[str], keep_suspect: bool = False) -> int:
    """Keep every valid record; end the suspect keys unless told to keep them; replace the file atomically;
    keep the original as FILE.corrupt-<time>."""
    progress = Progress("repairing", _size(path))
    try:
        done = repair_file(path, keep_suspect=keep_suspect, progress=progress.update)
    except FileProblem as exc:
        raise ToolError(EX_NOINPUT, str(exc)) from None
    except FileLockedError:
        raise ToolError(EX_TEMPFAIL, f"{path}: held by a running process; stop it first") from None
    except (OSError, StoreError) as exc:
        raise ToolError(EX_DAMAGED, f"{path}: repair failed, the file is as it was: {exc}") from None
    finally:
        progress.finish()
    if isinstance(done, FileScan):
        if done.header_error is not None:
            raise ToolError(EX_DAMAGED, f"{path}: {done.header_error}: not repairing a file it cannot read")
        if done.new_file:
            out.write(f"{path}: an empty file or an incomplete header: the next open starts it anew\n")
        else:
            out.write(f"{path}: clean, nothing to repair\n")
        return EX_OK
    found = done.scan
    dropped = found.size - found.header_size - done.kept_bytes
    out.write(f"{path}: kept {done.kept_records} records ({done.kept_bytes} bytes), dropped {dropped} bytes; "
              f"the original is {done.aside}\n")
    if done.ended:
        out.write(f"ended {len(done.ended)} keys whose last record comes before the damage (a later record of "
                  f"theirs, such as a deletion, may have been lost in it); --keep-suspect keeps them\n")
    elif done.suspect:
        out.write(f"kept {len(done.suspect)} suspect keys as their last valid record left them (a later "
                  f"record, such as a deletion, may have been lost in the damage):\n")
        for key in done.suspect:
            out.write(f"  {json.dumps(key)}\n")
    return EX_OK


def shrink(path: str, out: IO[str]) -> int:
    try:
        before, after = shrink_file(path)
    except FileProblem as exc:
        raise ToolError(EX_NOINPUT, str(exc)) from None
    except FileLockedError:
        raise ToolError(EX_TEMPFAIL, f"{path}: held by a running process; stop it first") from None
    except CorruptFileError as exc:
        raise ToolError(EX_DAMAGED, f"{path}: damaged, not shrinking it ({exc}); `repair` it first") from None
    except StoreError as exc:
        raise ToolError(EX_NOINPUT, f"{path}: {exc}") from None
    out.write(f"{path}: {before} -> {after} bytes\n")
    return EX_OK


# -- helpers ------------------------------------------------------------------------------------------------


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(seconds) >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


COMMANDS: dict[str, Callable[..., int]] = {"check": check, "stats": stats, "dump": dump, "repair": repair,
                                           "shrink": shrink}
