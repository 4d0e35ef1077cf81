"""The data file's format: a file header, then records. Pure functions, no I/O.

File header, version 2 (20 bytes)::

    magic "BUNTSESS" | version u16 | flags u16 | salt u32 | crc32 of the 16 bytes before it, u32

Record (28-byte header, then the key and the value)::

    marker 4 bytes | type u8 | flags u8 | key length u16 | value length u32 | expire_at f64
    | crc32 of key + value, u32 | crc32 of the 24 header bytes before it, u32 | key | value

Both record checksums start from the file's salt (crc32's starting value), a random number drawn when
the file is created and kept by every rewrite. Values are written as given, so a value may hold the bytes
of a whole record; but framed without this file's salt (which only the file holds) it fails the checksums,
so no value is ever read back as a record, not even when damage makes a reader search for the next record
inside it. Version 1 files (a 16-byte header without the salt: the checksums start from 0) are still read
and appended to as they are; their rewrites keep version 1.

All integers are little-endian. `expire_at` is an absolute unix time in seconds, meaningful only when the
HAS_EXPIRY flag is set. A DEL record has an empty value; an EXPIRE record has an empty value and changes
only the key's expiry (without HAS_EXPIRY it makes the key persistent).

The header checksum lets a reader trust the lengths before it touches the payload, so a damaged length
never sends it past the record; the marker lets it look for the next record after a damaged one, which is
how damage (something valid follows) is told from a torn tail (nothing valid follows).
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

MAGIC: Final = b"BUNTSESS"
VERSION: Final = 2
FILE_HEADER: Final = struct.Struct("<8sHHII")
FILE_HEADER_SIZE: Final = FILE_HEADER.size
"""The header of the files this version creates."""
FILE_HEADER_V1: Final = struct.Struct("<8sHHI")

MARKER: Final = b"\xb5\x0e\x5e\x55"
_HEAD: Final = struct.Struct("<4sBBHIdI")  # the 24 bytes the header checksum covers
_CRC: Final = struct.Struct("<I")
RECORD_HEADER_SIZE: Final = _HEAD.size + _CRC.size

SET: Final = 1
DEL: Final = 2
EXPIRE: Final = 3
_TYPES: Final = frozenset((SET, DEL, EXPIRE))
HAS_EXPIRY: Final = 0x01

MAX_KEY_SIZE: Final = 0xFFFF
MAX_VALUE_SIZE: Final = 64 * 1024 * 1024
"""Larger values are refused by `DB.set`, and a length over this cap is never believed when reading."""

_crc32 = zlib.crc32


@dataclass(frozen=True, slots=True)
class FileHeader:
    """What a file's header says: its version, its salt (the checksums' starting value), its size."""

    version: int
    salt: int
    size: int

    def encode(self) -> bytes:
        """These header bytes again (a rewrite keeps the version and the salt of the file it replaces)."""
        if self.version == 1:
            head = FILE_HEADER_V1.pack(MAGIC, 1, 0, 0)[:-4]
        else:
            head = FILE_HEADER.pack(MAGIC, self.version, 0, self.salt, 0)[:-4]
        return head + _CRC.pack(_crc32(head))


def new_file_header() -> FileHeader:
    """The header of a new file: this version, a fresh random salt (never 0, the salt of version 1)."""
    salt = 0
    while not salt:
        salt = int.from_bytes(os.urandom(4), "little")
    return FileHeader(VERSION, salt, FILE_HEADER_SIZE)


def encode_file_header() -> bytes:
    """A new file's header bytes."""
    return new_file_header().encode()


def encode_record(rtype: int, key: bytes, value: bytes, expire_at: float | None, salt: int = 0) -> bytes:
    """Frame one record for a file with this `salt`. The caller has checked the sizes against
    MAX_KEY_SIZE and MAX_VALUE_SIZE."""
    if expire_at is None:
        flags, exp = 0, 0.0
    else:
        flags, exp = HAS_EXPIRY, expire_at
    head = _HEAD.pack(MARKER, rtype, flags, len(key), len(value), exp, _crc32(value, _crc32(key, salt)))
    return b"".join((head, _CRC.pack(_crc32(head, salt)), key, value))


class HeaderError(Exception):
    """The file header is not that of a buntsession file this version can read. `torn` marks a short header."""

    def __init__(self, reason: str, *, torn: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.torn = torn


def check_file_header(data: bytes | memoryview) -> FileHeader:
    """The header `data` starts with; HeaderError unless it is a valid header of a version this code reads."""
    head = bytes(data[:FILE_HEADER_SIZE])
    if len(head) < 12:
        if MAGIC.startswith(head[: len(MAGIC)]):
            raise HeaderError("file header is incomplete", torn=True)
        raise HeaderError("not a buntsession data file (wrong magic)")
    magic, version = head[:8], int.from_bytes(head[8:10], "little")
    if magic != MAGIC:
        raise HeaderError("not a buntsession data file (wrong magic)")
    size = FILE_HEADER_V1.size if version == 1 else FILE_HEADER_SIZE
    if len(head) < size:
        raise HeaderError("file header is incomplete", torn=True)
    head = head[:size]
    if _crc32(head[:-4]) != _CRC.unpack_from(head, size - 4)[0]:
        raise HeaderError("file header checksum mismatch")
    if version > VERSION:
        raise HeaderError(f"file format version {version} is newer than this buntsession reads ({VERSION})")
    if version < 1:
        raise HeaderError(f"unknown file format version {version}")
    salt = 0 if version == 1 else FILE_HEADER.unpack(head)[3]
    return FileHeader(version, salt, size)


@dataclass(frozen=True, slots=True)
class Damage:
    """Why the bytes at `offset` are not a valid record, and where a later valid record starts (if any)."""

    offset: int
    reason: str
    next_valid: int | None
    fatal: bool = False
    """True for a record whose checksums hold but whose content this version cannot use: never a torn tail."""

    @property
    def corrupt(self) -> bool:
        """The one rule for what is damage rather than a torn tail: an unusable record, or invalid bytes that
        a valid record follows. Open, shared-mode catch-up and the operator tools all judge by it."""
        return self.fatal or self.next_valid is not None


Apply = Callable[[int, str, bytes, float | None], None]


def _check(buf: memoryview, pos: int, end: int, salt: int) -> tuple[int, str]:
    """Validate the record at `pos`. Return (record end, "") or (resume offset for the search, reason).

    The resume offset is where a search for a later valid record may start: just past `pos` when the
    header cannot be trusted, past the whole record when the header (and so its length) holds.
    A reason starting with "!" is fatal: the record's checksums hold but its content is unusable.
    """
    if end - pos < RECORD_HEADER_SIZE:
        return pos + 1, "incomplete record header"
    marker, rtype, flags, klen, vlen, exp, pcrc = _HEAD.unpack_from(buf, pos)
    if marker != MARKER:
        return pos + 1, "no record marker"
    if _crc32(buf[pos : pos + 24], salt) != _CRC.unpack_from(buf, pos + 24)[0]:
        return pos + 1, "record header checksum mismatch"
    if vlen > MAX_VALUE_SIZE:
        return pos + 1, f"record length {vlen} over the cap"
    stop = pos + RECORD_HEADER_SIZE + klen + vlen
    if stop > end:
        return end, "record runs past the end of the file"
    body = pos + RECORD_HEADER_SIZE
    if _crc32(buf[body + klen : stop], _crc32(buf[body : body + klen], salt)) != pcrc:
        return stop, "record payload checksum mismatch"
    if rtype not in _TYPES:
        return stop, f"!unknown record type {rtype}"
    if flags & ~HAS_EXPIRY or klen == 0 or (rtype != SET and vlen) or (flags and not math.isfinite(exp)):
        return stop, "!malformed record"
    return stop, ""


def find_valid_record(buf: memoryview, start: int, end: int, salt: int) -> int | None:
    """Offset of the first valid record at or after `start`, or None. `buf` views a whole bytes or mmap."""
    find = buf.obj.find if isinstance(buf.obj, bytes | mmap.mmap) else bytes(buf).find
    pos = start
    while True:
        pos = find(MARKER, pos, end)
        if pos < 0:
            return None
        _, reason = _check(buf, pos, end, salt)
        if not reason:
            return pos
        pos += 1


def replay(buf: memoryview, start: int, apply: Apply, salt: int) -> tuple[int, Damage | None]:
    """Apply every valid record from `start` in order. Return (end of the last valid record, damage or None).

    Replay stops at the first invalid record. The returned Damage says whether a valid record follows
    (`next_valid`), which makes it damage rather than a torn tail. Keys are decoded as UTF-8.
    """
    end = len(buf)
    pos = start
    unpack_head = _HEAD.unpack_from
    unpack_crc = _CRC.unpack_from
    crc32 = _crc32
    while pos < end:
        # The common case, inlined: a well-formed record. Anything unusual goes through _check.
        if end - pos >= RECORD_HEADER_SIZE:
            marker, rtype, flags, klen, vlen, exp, pcrc = unpack_head(buf, pos)
            body = pos + RECORD_HEADER_SIZE
            stop = body + klen + vlen
            if (
                marker == MARKER
                and crc32(buf[pos : pos + 24], salt) == unpack_crc(buf, pos + 24)[0]
                and vlen <= MAX_VALUE_SIZE
                and stop <= end
                and crc32(buf[body + klen : stop], crc32(buf[body : body + klen], salt)) == pcrc
                and rtype in _TYPES
                and klen
                and not flags & ~HAS_EXPIRY
                and (rtype == SET or not vlen)
                and (not flags or math.isfinite(exp))
            ):
                try:
                    key = str(buf[body : body + klen], "utf-8")
                except UnicodeDecodeError:
                    return pos, Damage(pos, "record key is not valid UTF-8", None, fatal=True)
                apply(rtype, key, bytes(buf[body + klen : stop]), exp if flags else None)
                pos = stop
                continue
        resume, reason = _check(buf, pos, end, salt)
        if reason.startswith("!"):
            return pos, Damage(pos, reason[1:], None, fatal=True)
        return pos, Damage(pos, reason, find_valid_record(buf, resume, end, salt))
    return pos, None


@dataclass(frozen=True, slots=True)
class Record:
    """One valid record, as the operator tools see it."""

    offset: int
    end: int
    rtype: int
    key: str
    value: bytes
    expire_at: float | None


def walk(buf: memoryview, start: int, salt: int) -> Iterator[Record | Damage]:
    """Every valid record in file order, and a Damage for each stretch that is not one. A Damage's
    `next_valid` says where the walk goes on; None means the rest of the file is a tail, and the walk ends."""
    end = len(buf)
    pos = start
    while pos < end:
        stop, reason = _check(buf, pos, end, salt)
        if not reason:
            _, rtype, flags, klen, _, exp, _ = _HEAD.unpack_from(buf, pos)
            body = pos + RECORD_HEADER_SIZE
            try:
                key = str(buf[body : body + klen], "utf-8")
            except UnicodeDecodeError:
                reason = "!record key is not valid UTF-8"
            else:
                yield Record(pos, stop, rtype, key, bytes(buf[body + klen : stop]), exp if flags else None)
                pos = stop
                continue
        fatal = reason.startswith("!")
        following = find_valid_record(buf, stop, end, salt)
        yield Damage(pos, reason.lstrip("!"), following, fatal)
        if following is None:
            return
        pos = following
