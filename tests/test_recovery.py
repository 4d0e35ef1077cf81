"""Opening a file: torn tails are cut, damage is refused with its offset, bad paths get clear errors."""

from __future__ import annotations

import logging
import os
import random
import time
import tracemalloc
from pathlib import Path

import anyio
import pytest
from helpers import fix_record_checksums, read_state, record_offsets, write_file

from buntsession import DB, CorruptFileError, StoreError
from buntsession.engine import format as fmt
from buntsession.engine.log import REWRITE_SUFFIX


def build_file(path: str) -> tuple[bytes, list[dict[str, bytes]]]:
    """Write a mix of records; return the file and the expected state after each complete record."""
    rng = random.Random(7)
    states: list[dict[str, bytes]] = [{}]
    model: dict[str, bytes] = {}

    async def main() -> None:
        async with DB(path) as db:
            for i in range(40):
                key = f"key:{rng.randrange(12)}"
                op = rng.random()
                if op < 0.2 and key in model:
                    await db.delete(key)
                    del model[key]
                elif op < 0.3 and key in model:
                    await db.expire(key, 3600 if rng.random() < 0.5 else None)
                else:
                    value = rng.randbytes(rng.randrange(0, 40))
                    await db.set(key, value, ttl=3600 if i % 3 else None)
                    model[key] = value
                states.append(dict(model))

    anyio.run(main)
    data = Path(path).read_bytes()
    assert len(record_offsets(data)) - 1 == len(states) - 1  # one record per operation
    return data, states


def test_truncation_at_every_offset_keeps_every_complete_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    original = str(tmp_path / "orig.db")
    data, states = build_file(original)
    offsets = record_offsets(data)
    path = str(tmp_path / "cut.db")
    caplog.set_level(logging.WARNING, logger="buntsession")
    for cut in range(len(data) + 1):
        write_file(path, data[:cut])
        caplog.clear()
        complete = sum(1 for end in offsets[1:] if end <= cut)
        assert read_state(path) == states[complete], f"cut at {cut}"
        boundary = offsets[complete] if cut >= fmt.FILE_HEADER_SIZE else fmt.FILE_HEADER_SIZE
        assert os.path.getsize(path) == boundary, f"cut at {cut}"
        if cut > boundary and cut >= fmt.FILE_HEADER_SIZE:
            (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert path in warning and f"offset {boundary}" in warning and f"{cut - boundary} bytes" in warning
    # After a recovery, new records land cleanly behind the complete ones.
    write_file(path, data[: offsets[-2] + 9])

    async def append() -> None:
        async with DB(path) as db:
            await db.set("after", b"recovery")

    anyio.run(append)
    assert read_state(path) == {**states[-2], "after": b"recovery"}


def test_every_bit_flip_before_the_last_record_is_reported_with_its_offset(tmp_path: Path) -> None:
    original = str(tmp_path / "orig.db")
    data, _ = build_file(original)
    offsets = record_offsets(data)
    path = str(tmp_path / "flipped.db")
    for pos in range(offsets[-2]):
        for bit in (0x01, 0x80):
            damaged = bytearray(data)
            damaged[pos] ^= bit
            write_file(path, bytes(damaged))
            with pytest.raises(CorruptFileError) as info:
                read_state(path)
            record_start = max([0, *[o for o in offsets[:-1] if o <= pos]])
            assert info.value.offset == record_start, f"flip at {pos}"
            assert info.value.path == path
            assert Path(path).read_bytes() == bytes(damaged), "a damaged file must be left untouched"


def test_a_flip_in_the_last_record_is_a_torn_tail(tmp_path: Path) -> None:
    path = str(tmp_path / "d.db")
    data, states = build_file(path)
    last = record_offsets(data)[-2]
    damaged = bytearray(data)
    damaged[-1] ^= 0xFF
    write_file(path, bytes(damaged))
    assert read_state(path) == states[-2]
    assert os.path.getsize(path) == last


@pytest.mark.parametrize("size", [1, 7, 27, 512, 4096, 65536])
@pytest.mark.parametrize("kind", ["zeros", "garbage"])
def test_zero_or_garbage_tail_is_cut(tmp_path: Path, size: int, kind: str) -> None:
    path = str(tmp_path / "d.db")
    data, states = build_file(path)
    tail = bytes(size) if kind == "zeros" else random.Random(size).randbytes(size)
    write_file(path, data + tail)
    assert read_state(path) == states[-1]
    assert Path(path).read_bytes() == data


@pytest.mark.parametrize("length", [2**31 - 1, fmt.MAX_VALUE_SIZE + 1, 2**32 - 1])
def test_hostile_length_is_refused_fast_without_allocating(tmp_path: Path, length: int) -> None:
    path = str(tmp_path / "d.db")
    data, states = build_file(path)
    offsets = record_offsets(data)
    for target, expect_torn in ((offsets[-2], True), (offsets[3], False)):
        damaged = bytearray(data)
        damaged[target + 8 : target + 12] = length.to_bytes(4, "little")
        fix_record_checksums(damaged, target)  # a forged length that passes the header checksum
        write_file(path, bytes(damaged))
        tracemalloc.start()
        started = time.perf_counter()
        try:
            if expect_torn:
                assert read_state(path) == states[-2]
            else:
                with pytest.raises(CorruptFileError) as info:
                    read_state(path)
                assert info.value.offset == target
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert time.perf_counter() - started < 2.0
        assert peak < 1024 * 1024, f"peak allocation {peak} bytes"


def test_damaged_length_field_followed_by_valid_records_is_damage(tmp_path: Path) -> None:
    path = str(tmp_path / "d.db")
    data, _ = build_file(path)
    offsets = record_offsets(data)
    damaged = bytearray(data)
    damaged[offsets[5] + 9] ^= 0x40  # value length, header checksum left stale
    write_file(path, bytes(damaged))
    with pytest.raises(CorruptFileError, match="checksum") as info:
        read_state(path)
    assert info.value.offset == offsets[5]


def test_unknown_record_type_with_good_checksums_is_never_cut_as_a_tail(tmp_path: Path) -> None:
    path = str(tmp_path / "d.db")
    data, _ = build_file(path)
    last = record_offsets(data)[-2]
    damaged = bytearray(data)
    damaged[last + 4] = 99
    fix_record_checksums(damaged, last)
    write_file(path, bytes(damaged))
    with pytest.raises(CorruptFileError, match="unknown record type") as info:
        read_state(path)
    assert info.value.offset == last
    assert Path(path).read_bytes() == bytes(damaged)


def test_wrong_magic_and_newer_version_are_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "d.db")
    sqlite_like = b"SQLite format 3\x00" + bytes(100)
    write_file(path, sqlite_like)
    with pytest.raises(CorruptFileError, match="not a buntsession data file") as info:
        read_state(path)
    assert info.value.offset == 0
    assert Path(path).read_bytes() == sqlite_like

    head = fmt.FILE_HEADER.pack(fmt.MAGIC, fmt.VERSION + 1, 0, 0, 0)[:-4]
    future = head + __import__("zlib").crc32(head).to_bytes(4, "little")
    write_file(path, future)
    with pytest.raises(CorruptFileError, match="newer"):
        read_state(path)
    assert Path(path).read_bytes() == future


def test_empty_file_and_torn_header_start_anew(tmp_path: Path) -> None:
    path = str(tmp_path / "d.db")
    for content in (b"", fmt.encode_file_header()[:9], fmt.encode_file_header()[:17]):
        write_file(path, content)
        assert read_state(path) == {}
        data = Path(path).read_bytes()
        assert len(data) == fmt.FILE_HEADER_SIZE and fmt.check_file_header(data).version == fmt.VERSION


def test_expired_overwrite_does_not_resurrect_the_older_value(tmp_path: Path) -> None:
    path = str(tmp_path / "d.db")

    async def write() -> None:
        async with DB(path) as db:
            await db.set("k", b"forever")
            await db.set("k", b"brief", ttl=0.05)
            await db.set("other", b"stays")

    anyio.run(write)
    time.sleep(0.1)
    assert read_state(path) == {"other": b"stays"}

    async def shrink() -> None:
        async with DB(path) as db:
            await db.shrink()

    anyio.run(shrink)
    assert b"forever" not in Path(path).read_bytes()
    assert read_state(path) == {"other": b"stays"}


def test_leftover_rewrite_file_is_removed_on_open(tmp_path: Path) -> None:
    path = str(tmp_path / "d.db")
    build_file(path)
    Path(path + REWRITE_SUFFIX).write_bytes(b"half a rewrite")
    read_state(path)
    assert not os.path.exists(path + REWRITE_SUFFIX)


def _open(path: str) -> None:
    async def main() -> None:
        async with DB(path):
            pass

    anyio.run(main)


def test_unusable_paths_raise_clear_errors_and_create_nothing(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file").write_bytes(b"")
    before = sorted(os.listdir(tmp_path))
    cases = {
        str(tmp_path / "missing" / "d.db"): "does not exist",
        str(tmp_path / "adir"): "directory",
        str(tmp_path / "fifo"): "FIFO",
        str(tmp_path / "file" / "d.db"): "not a directory",
    }
    for path, message in cases.items():
        with pytest.raises(StoreError, match=message):
            _open(path)
    with pytest.raises(StoreError, match="device"):
        _open("/dev/null")
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "file").read_bytes() == b""
