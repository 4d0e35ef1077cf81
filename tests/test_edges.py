"""Edges of the engine found by trying it as a hostile user would (issue 10), each reproduced here."""

from __future__ import annotations

import array
import errno
import os
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import FaultyOps, contents, read_state

from buntsession import DB, FileLockedError, StoreError


def _run(main, *args):  # type: ignore[no-untyped-def]
    return anyio.run(main, *args)


class DeniedOps(FaultyOps):
    """The OS refusing to create the file, as a read-only directory does (the tests run as root, who may
    write anywhere, so the refusal is injected at the system call; a non-root run also tries the real one)."""

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return super().open(path, flags, mode)


def test_an_os_error_on_open_is_a_store_error_naming_the_path(tmp_path: Path) -> None:
    path = str(tmp_path / "new.db")
    db = DB(path)
    db._fileops = DeniedOps()

    async def main() -> None:
        await db.open()

    with pytest.raises(StoreError) as info:
        _run(main)
    assert path in str(info.value) and "Permission denied" in str(info.value)
    assert isinstance(info.value.__cause__, PermissionError)
    assert not os.path.exists(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may create files in a read-only directory")
def test_a_read_only_directory_is_a_store_error(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(StoreError, match="Permission denied"):
            read_state(str(tmp_path / "new.db"))
    finally:
        os.chmod(tmp_path, 0o700)


def test_a_dangling_symlink_creates_the_file_it_points_to(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    link = tmp_path / "sessions.db"
    link.symlink_to(volume / "sessions.db")

    async def main() -> None:
        with anyio.fail_after(10):  # it used to retry the exclusive create forever
            async with DB(str(link)) as db:
                await db.set("k", b"v")

    _run(main)
    assert link.is_symlink() and (volume / "sessions.db").is_file()
    assert read_state(str(volume / "sessions.db")) == {"k": b"v"}


def test_a_symlinked_file_stays_a_symlink_through_a_rewrite_and_is_locked_by_either_name(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    target = volume / "sessions.db"
    link = tmp_path / "sessions.db"
    link.symlink_to(target)

    async def main() -> None:
        async with DB(str(link)) as db:
            for i in range(50):
                await db.set(f"k{i}", b"x" * 100)
            await db.shrink()
            await db.set("after", b"the rewrite")
            with pytest.raises(FileLockedError):
                await DB(str(target)).open()
            assert not os.path.exists(str(link) + ".rewrite")
        async with DB(str(target)):
            with pytest.raises(FileLockedError):
                await DB(str(link)).open()

    _run(main)
    assert link.is_symlink() and os.readlink(link) == str(target)
    state = read_state(str(target))
    assert state["after"] == b"the rewrite" and len(state) == 51


def test_any_bytes_like_value_is_taken(db_path: str) -> None:
    async def main() -> None:
        async with DB(db_path) as db:
            await db.set("array", array.array("H", [1, 2, 3]))
            await db.update("array2", lambda _: (array.array("b", [7]), None))  # type: ignore[arg-type,return-value]
            assert await db.get("array") == array.array("H", [1, 2, 3]).tobytes()
            assert await db.get("array2") == b"\x07"
            with pytest.raises(TypeError):
                await db.set("text", "not bytes")  # type: ignore[arg-type]
            assert await contents(db) == {"array": array.array("H", [1, 2, 3]).tobytes(), "array2": b"\x07"}

    _run(main)


def test_a_huge_number_is_named_briefly_in_the_error(db_path: str) -> None:
    async def main() -> None:
        async with DB(db_path) as db:
            for call in (lambda: db.set("k", b"v", ttl=10**400), lambda: db.expire("k", 10**400),
                         lambda: db.set("k", b"v", expire_at=10**400), lambda: db.set("k", b"v", ttl=-(10**400))):
                with pytest.raises(ValueError) as info:
                    await call()
                assert len(str(info.value)) < 120, str(info.value)

    _run(main)


def test_a_data_file_deleted_under_a_running_db_is_put_back(db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with DB(db_path, cleanup_interval=0.05) as db:
            for i in range(100):
                await db.set(f"k{i}", f"v{i}".encode())
            os.unlink(db_path)
            with anyio.fail_after(10):  # the background pass notices, says so, and writes the live set back
                while not os.path.exists(db_path):
                    await anyio.sleep(0.02)
            await db.set("after", b"written to the restored file")
            assert db.stats().shrinks == 1
            os.unlink(db_path)
            await db.shrink()  # an explicit shrink does not pretend: it puts the file back too
            assert os.path.exists(db_path)
            os.unlink(db_path)
            await db.set("last", b"before close")  # and close puts it back, whatever the background did

    _run(main)
    state = read_state(db_path)
    assert len(state) == 102 and state["after"] == b"written to the restored file" and state["last"] == b"before close"
    assert any("deleted" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


def test_one_db_used_from_two_event_loops_at_once_under_always(db_path: str) -> None:
    """The contract allows one thread at a time; two at once work (writes serialise, each thread leads its
    own group commit) rather than hanging on another loop's event."""
    import threading

    db = DB(db_path, sync="always")
    anyio.run(db.open)
    errors: list[BaseException] = []

    def writer(name: str, backend: str) -> None:
        async def main() -> None:
            async with anyio.create_task_group() as tg:
                for t in range(4):
                    async def run(t: int = t) -> None:
                        for i in range(100):
                            await db.set(f"{name}{t}:{i % 10}", f"{name}-{t}-{i}".encode())
                            await db.update(f"{name}:count", lambda old: (str(int(old or b"0") + 1).encode(), None))
                    tg.start_soon(run)

        try:
            anyio.run(main, backend=backend)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(name, backend)) for name, backend in
               (("a", "asyncio"), ("b", "trio"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a writer hung"
    assert errors == []

    async def finish() -> dict[str, bytes]:
        state = await contents(db)
        await db.close()
        return state

    state = anyio.run(finish)
    expected = {f"{n}{t}:{k}": f"{n}-{t}-{90 + k}".encode() for n in "ab" for t in range(4) for k in range(10)}
    expected |= {"a:count": b"400", "b:count": b"400"}
    assert state == expected
    assert read_state(db_path) == expected


@pytest.mark.parametrize("sync", ["everysec", "never"])
def test_a_second_thread_while_the_opening_thread_writes_on_its_fast_path(db_path: str, sync: str) -> None:
    """The thread that opened a DB writes without taking the guard (its fast path); a second thread that
    writes meanwhile ends that (waiting for a fast step in progress), and no increment is lost. Every step
    here releases the GIL in its write call, so a second thread that did not wait would interleave often."""
    import threading

    rounds = 3000
    started = threading.Event()
    errors: list[BaseException] = []
    db = DB(db_path, sync=sync)  # type: ignore[arg-type]

    def incr(old: bytes | None) -> tuple[bytes, float | None]:
        return str(int(old or b"0") + 1).encode(), None

    def second() -> None:
        async def main() -> None:
            started.wait(10)
            for i in range(rounds):
                await db.update("n", incr)
                await db.set(f"b:{i % 20}", b"b")

        try:
            anyio.run(main, backend="trio")
        except BaseException as exc:  # reported below
            errors.append(exc)

    async def opener() -> dict[str, bytes]:
        async with db:
            assert db._solo == threading.get_ident()
            thread = threading.Thread(target=second)
            thread.start()
            started.set()
            for i in range(rounds):
                await db.update("n", incr)
                await db.set(f"a:{i % 20}", b"a")
            await anyio.to_thread.run_sync(thread.join, 60)
            assert not thread.is_alive(), "the second thread hung"
            assert db._solo == 0  # the second thread ended the opener's fast path
            return await contents(db)

    state = anyio.run(opener)
    assert errors == []
    assert state["n"] == str(2 * rounds).encode()
    assert len(state) == 41
    assert read_state(db_path) == state


def test_a_close_from_another_thread_loses_no_acknowledged_write(db_path: str) -> None:
    """The opening thread writes on its fast path while another thread closes the DB, and the close is
    held up (a trace hook sleeps, as a forced thread switch would) in the middle of dropping the file and
    the index: every set() that returned is in the file after reopen; the others raise StoreError."""
    import linecache
    import sys
    import threading
    import time

    import buntsession.engine.db as dbmod

    db = DB(db_path)
    opened, closed = threading.Event(), threading.Event()
    paused: list[bool] = []
    acknowledged: list[str] = []
    refused: list[StoreError] = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if event == "call" and frame.f_code.co_name == "_release" and frame.f_code.co_filename == dbmod.__file__:
            def local(frame: Any, event: str, arg: Any) -> Any:
                if event == "line" and "_open_dbs.discard" in linecache.getline(frame.f_code.co_filename,
                                                                                  frame.f_lineno):
                    paused.append(True)
                    time.sleep(0.05)  # the GIL goes to the writing thread
                return local
            return local
        return None

    async def writer() -> None:
        await db.open()
        opened.set()
        i = 0
        while not closed.is_set():
            i += 1
            try:
                await db.set(f"k{i}", b"v")
            except StoreError as exc:
                refused.append(exc)
                return
            acknowledged.append(f"k{i}")
            time.sleep(0.001)

    async def closer() -> None:
        opened.wait(10)
        time.sleep(0.02)
        sys.settrace(tracer)
        try:
            await db.close()
        finally:
            sys.settrace(None)
            closed.set()

    threads = [threading.Thread(target=anyio.run, args=(writer,)),
               threading.Thread(target=anyio.run, args=(closer,), kwargs={"backend": "trio"})]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert paused and acknowledged and refused, (paused, len(acknowledged), refused)
    assert "closed" in str(refused[0])
    state = read_state(db_path)
    assert [key for key in acknowledged if key not in state] == []


def test_a_second_thread_ends_the_fast_path_before_its_periodic_work(db_path: str) -> None:
    """A write from a second thread may do overdue periodic work (an fsync, a rewrite) that changes when
    writes may take the fast path; it ends the opening thread's fast path first, so that no fast-path
    step of the opening thread can slip past a gate the work closes."""

    seen: list[int] = []

    async def opener() -> None:
        async with DB(db_path) as db:
            await db.set("a", b"1")
            real = db._work_as_calls_arrive

            async def work() -> None:
                seen.append(db._solo)
                await real()

            db._work_as_calls_arrive = work  # type: ignore[method-assign]
            db._work_due = 0.0  # overdue: the next general write does it

            def second() -> None:
                anyio.run(db.set, "b", b"2", backend="trio")

            await anyio.to_thread.run_sync(second)
            assert await db.get("b") == b"2"

    anyio.run(opener)
    assert seen == [0]


@pytest.mark.parametrize("fast", [True, False])
def test_an_expired_key_dropped_by_a_reader_in_another_thread_mid_update_is_no_error(db_path: str,
                                                                                      fast: bool) -> None:
    """A reader in another thread may drop an expired entry between the moment an update finds it and the
    moment it drops it: the update sees the key absent, as it is, and raises nothing."""

    class DroppedMeanwhile(dict[str, Any]):
        def get(self, key: str, default: Any = None) -> Any:
            found = super().get(key, default)
            self.pop(key, None)  # what the other thread's reader does, right after this lookup
            return found

    async def main() -> None:
        async with DB(db_path, sync="everysec" if fast else "always") as db:
            await db.set("k", b"old", expire_at=1.0)  # already expired
            db._index.data = DroppedMeanwhile(db._index.data)
            seen: list[bytes | None] = []
            assert await db.update("k", lambda old: (seen.append(old), (b"new", None))[1])
            assert seen == [None]
            db._index.data = dict(db._index.data)
            assert await db.get("k") == b"new"

    anyio.run(main)


def _embedding_file(path: str, torn: bool) -> tuple[bytes, int]:
    """A file whose record's value holds the bytes of a whole record (framed as anyone could frame one,
    without this file's salt), with that record's header zeroed: damage (or, last in the file, a torn tail)
    that sends a reader searching for the next record, inside the value."""
    from buntsession.engine import format as fmt

    forged = fmt.encode_record(fmt.SET, b"admin", b"granted", None)
    forged_v1 = fmt.encode_record(fmt.SET, b"admin", b"granted", None, 0x5EED)  # and with a guessed salt

    async def fill() -> None:
        async with DB(path) as db:
            await db.set("first", b"1")
            await db.set("profile", b"bio: " + forged + forged_v1)
            if not torn:
                await db.set("after", b"2")

    anyio.run(fill)
    from helpers import record_offsets

    data = bytearray(Path(path).read_bytes())
    at = record_offsets(bytes(data))[1]
    data[at : at + 28] = bytes(28)
    Path(path).write_bytes(bytes(data))
    return bytes(data), at


def test_a_value_holding_a_record_is_never_read_back_as_one(tmp_path: Path) -> None:
    """Edge 2: `repair` used to write `admin = granted`, a key never set; `dump` listed it."""
    import json
    import subprocess
    import sys

    path = str(tmp_path / "d.db")
    _embedding_file(path, torn=False)
    done = subprocess.run([sys.executable, "-m", "buntsession", "dump", path], capture_output=True, text=True,
                          timeout=60, check=False)
    assert "admin" not in done.stdout and done.returncode in (0, 2)
    done = subprocess.run([sys.executable, "-m", "buntsession", "repair", "--keep-suspect", path],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done
    assert "admin" not in read_state(path)
    keys = {json.loads(line)["key"] for line in subprocess.run(
        [sys.executable, "-m", "buntsession", "dump", path], capture_output=True, text=True, timeout=60,
        check=False).stdout.splitlines()}
    assert keys == {"first", "after"}  # the real record after the damage is found; the one in the value is not


def test_a_torn_last_record_whose_value_holds_a_record_is_cut_as_a_tail(tmp_path: Path) -> None:
    """Edge 2: open used to raise CorruptFileError, taking the embedded record for one after damage."""
    path = str(tmp_path / "d.db")
    _, at = _embedding_file(path, torn=True)
    assert read_state(path) == {"first": b"1"}  # the torn record is cut, the file opens
    assert os.path.getsize(path) == at


def test_a_version_1_file_is_read_appended_to_and_rewritten_as_version_1(tmp_path: Path) -> None:
    import zlib

    from buntsession.engine import format as fmt

    head = fmt.FILE_HEADER_V1.pack(fmt.MAGIC, 1, 0, 0)[:-4]
    v1 = head + zlib.crc32(head).to_bytes(4, "little")
    v1 += fmt.encode_record(fmt.SET, b"old", b"from version 1", None) + fmt.encode_record(fmt.SET, b"x", b"1", None)
    path = str(tmp_path / "v1.db")
    Path(path).write_bytes(v1)

    async def main() -> None:
        async with DB(path) as db:
            assert await contents(db) == {"old": b"from version 1", "x": b"1"}
            await db.set("new", b"appended")
            await db.delete("x")
        assert Path(path).read_bytes()[: len(v1)] == v1
        async with DB(path) as db:
            await db.shrink()
        assert fmt.check_file_header(Path(path).read_bytes()).version == 1

    _run(main)
    assert read_state(path) == {"old": b"from version 1", "new": b"appended"}
