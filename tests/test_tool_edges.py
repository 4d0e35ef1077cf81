"""The operator tools at their edges (issue 10): one clear line and the documented exit status, every time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from helpers import read_state, record_offsets

from buntsession import DB


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "buntsession", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def one_line_no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.fixture
def good(tmp_path: Path) -> str:
    path = str(tmp_path / "good.db")

    async def fill() -> None:
        async with DB(path) as db:
            for i in range(10):
                await db.set(f"k{i}", f"value {i}".encode())

    anyio.run(fill)
    return path


def test_a_fifo_is_refused_at_once_by_every_command(tmp_path: Path) -> None:
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    for command in ("check", "stats", "dump", "repair", "shrink"):
        done = run(command, fifo, timeout=20)  # used to hang in open()
        assert done.returncode == 66, (command, done)
        one_line_no_traceback(done)
        assert "not a regular file" in done.stderr


def test_shrink_of_a_damaged_or_foreign_file_is_one_line_and_status_2(good: str, tmp_path: Path) -> None:
    data = bytearray(Path(good).read_bytes())
    data[record_offsets(bytes(data))[2] + 30] ^= 0xFF
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(bytes(data))
    foreign = tmp_path / "foreign.db"
    foreign.write_bytes(b"SQLite format 3\x00" + bytes(100))
    for path in (damaged, foreign):
        before = path.read_bytes()
        done = run("shrink", str(path))
        assert done.returncode == 2, done
        one_line_no_traceback(done)
        assert path.read_bytes() == before


def test_an_unreadable_file_is_one_line_and_status_66(good: str) -> None:
    if os.geteuid() == 0:
        # Root reads any file: take the permission away with the tool's own seam instead (as a non-root run
        # does below with chmod), in a child that imports the tools and patches os.open to refuse.
        code = (
            "import errno, os, sys\n"
            "real = os.open\n"
            "def refuse(path, flags, *a, **k):\n"
            f"    if os.fspath(path) == {good!r}: raise PermissionError(errno.EACCES, 'Permission denied', path)\n"
            "    return real(path, flags, *a, **k)\n"
            "os.open = refuse\n"
            "from buntsession.__main__ import main\n"
            "sys.exit(main(sys.argv[1:]))\n"
        )
        for command in ("check", "stats", "dump", "repair"):
            done = subprocess.run([sys.executable, "-c", code, command, good], capture_output=True, text=True,
                                  timeout=30, check=False)
            assert done.returncode == 66, (command, done)
            one_line_no_traceback(done)
            assert "Permission denied" in done.stderr
        return
    os.chmod(good, 0)
    try:
        for command in ("check", "stats", "dump", "repair", "shrink"):
            done = run(command, good)
            assert done.returncode == 66, (command, done)
            one_line_no_traceback(done)
    finally:
        os.chmod(good, 0o600)


def test_two_repairs_in_one_second_each_keep_their_original(good: str, tmp_path: Path) -> None:
    for n in range(2):
        with open(good, "ab") as f:
            f.write(b"torn tail %d" % n)
        done = run("repair", good)
        assert done.returncode == 0, done
    asides = sorted(p for p in os.listdir(tmp_path) if p.startswith("good.db.corrupt-"))
    assert len(asides) == 2
    assert not any(p.endswith((".repair", ".rewrite")) for p in os.listdir(tmp_path))
    assert run("check", good).returncode == 0


def test_an_empty_file_is_clean_and_a_torn_header_is_a_torn_tail(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    done = run("check", str(empty))
    assert done.returncode == 0 and "empty" in done.stdout, done
    torn = tmp_path / "torn.db"
    torn.write_bytes(b"BUNTSE")
    assert run("check", str(torn)).returncode == 1
    assert read_state(str(empty)) == {} and read_state(str(torn)) == {}  # and the engine opens both


def test_repair_never_brings_a_deleted_key_back_silently(tmp_path: Path) -> None:
    """The damaged bytes held a DEL (a logout): the key's last valid record is its SET, before the damage.
    By default repair ends such suspect keys (and says how many); --keep-suspect keeps them and names them."""
    path = str(tmp_path / "s.db")

    async def fill() -> None:
        async with DB(path) as db:
            await db.set("session:alice", b"logged in")
            await db.set("session:bob", b"logged in")
            await db.delete("session:alice")  # the logout, whose record gets damaged below
            await db.set("session:carol", b"logged in after the damage")

    anyio.run(fill)
    data = bytearray(Path(path).read_bytes())
    delete_at = record_offsets(bytes(data))[2]
    data[delete_at + 1] ^= 0xFF  # the DEL's header no longer checks
    Path(path).write_bytes(bytes(data))
    keep = tmp_path / "keep.db"
    shutil.copy(path, keep)

    done = run("repair", path)
    assert done.returncode == 0, done
    assert "ended 2 keys" in done.stdout
    assert read_state(path) == {"session:carol": b"logged in after the damage"}  # alice never comes back

    done = run("repair", "--keep-suspect", str(keep))
    assert done.returncode == 0, done
    assert '"session:alice"' in done.stdout and '"session:bob"' in done.stdout  # named, not silent
    assert set(read_state(str(keep))) == {"session:alice", "session:bob", "session:carol"}
