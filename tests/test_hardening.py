"""Faults and hostile input: short writes, a full disk, failed fsyncs, tampered data, floods of requests."""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import FaultyOps, asgi_get, read_state, record_offsets
from session_app import make_app
from starlette.testclient import TestClient
from test_cookie_fuzz import CountingStore
from test_crash import CHILD

from buntsession import DB, BuntStore, StoreError
from buntsession.engine import format as fmt


def test_a_short_write_at_the_file_size_limit_is_cut_back_and_writes_resume(tmp_path: Path) -> None:
    path = str(tmp_path / "d.db")
    done = subprocess.run([sys.executable, CHILD, path, "fsize"], capture_output=True, text=True, timeout=60,
                          check=False)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr
    assert lines[0].startswith("REFUSED True") and lines[1].startswith("REFUSED True"), lines
    assert lines[2] == "RESUMED"
    record_offsets(Path(path).read_bytes())  # ends on a record boundary
    assert read_state(path) == {"before": b"x" * 100, "after": b"z" * 100}


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 256 KiB tmpfs, mounted for the test (root only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"could not mount a tmpfs: {done.stderr}")
        pytest.skip(f"could not mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(path: Path) -> None:
    """Fill the file system that holds `path` to the last byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        try:
            while True:
                os.write(fd, b"\0")
        except OSError:
            pass
    finally:
        os.close(fd)


def test_a_full_disk_fails_the_write_loudly_and_leaves_the_file_loadable(small_disk: Path) -> None:
    path = str(small_disk / "d.db")

    async def main() -> int:
        async with DB(path, autoshrink=False) as db:
            stored = 0
            with pytest.raises(StoreError) as info:
                for i in range(100_000):
                    await db.set(f"k{i}", os.urandom(1000))
                    stored += 1
            assert path in str(info.value)
            record_offsets(Path(path).read_bytes())  # no partial record
            assert await db.get("k0") is not None
            await db.set("small", b"fits")  # a failed write is not a failed DB
            return stored

    stored = anyio.run(main)
    assert stored > 50
    assert len(read_state(path)) == stored + 1


def test_writes_resume_when_space_returns_and_the_request_that_failed_got_a_503(small_disk: Path) -> None:
    path = str(small_disk / "d.db")
    filler = small_disk / "filler"
    client = TestClient(make_app(BuntStore(DB(path, autoshrink=False))))
    assert client.get("/put?a=1").status_code == 200
    fill_disk(filler)
    fresh = TestClient(client.app)
    failed = fresh.get("/put?b=" + "x" * 20_000)  # more than the slack in the file's last page
    assert failed.status_code == 503 and "set-cookie" not in failed.headers and "Traceback" not in failed.text
    assert client.get("/get").json() == {"a": "1"}  # reads go on
    filler.unlink()  # space returns
    assert fresh.get("/put?b=2").status_code == 200
    assert fresh.get("/get").json() == {"b": "2"}
    record_offsets(Path(path).read_bytes())


def test_a_failed_background_fsync_gives_503_until_the_db_is_reopened(tmp_path: Path) -> None:
    path = str(tmp_path / "d.db")
    db = DB(path)
    ops = FaultyOps()
    db._fileops = ops
    client = TestClient(make_app(BuntStore(db)))
    client.get("/put?a=1")
    ops.fail_fsyncs = 1
    client.get("/put?b=2")  # written; the next background fsync fails
    deadline = time.monotonic() + 10
    while db._failed is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.get("/put?c=3").status_code == 503
    assert client.get("/get").json() == {"a": "1", "b": "2"}
    anyio.run(db.close)  # the operator restarts the app: a new process opens the file again
    restarted = TestClient(make_app(BuntStore(DB(path))), cookies=client.cookies)
    assert restarted.get("/put?c=3").status_code == 200
    assert restarted.get("/get").json() == {"a": "1", "b": "2", "c": "3"}


def test_tokens_are_unique_and_of_the_stated_form() -> None:
    from buntsession.session import new_token

    tokens = {new_token() for _ in range(100_000)}
    assert len(tokens) == 100_000
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{43}", t) for t in tokens)


def test_a_tampered_stored_session_loads_fresh_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "d.db")
    client = TestClient(make_app(BuntStore(DB(path))))
    client.get("/put?role=user")
    anyio.run(client.app.store.db.close)  # type: ignore[attr-defined]
    data = bytearray(Path(path).read_bytes())
    offset = record_offsets(bytes(data))[-2]
    body = offset + 28
    key_len = int.from_bytes(data[offset + 6 : offset + 8], "little")
    value_len = int.from_bytes(data[offset + 8 : offset + 12], "little")
    value = bytes(data[body + key_len : body + key_len + value_len])
    forged = value.replace(b'"d":{', b'"d":{"x":"\\u0000bogus",', 1).replace(b'"v":2', b'"v":9', 1)
    assert len(forged) != len(value)
    record = data[offset : body + key_len] + forged
    record[8:12] = len(forged).to_bytes(4, "little")
    salt = fmt.check_file_header(bytes(data)).salt  # a tamperer with the file has its salt too
    record[20:24] = zlib.crc32(forged, zlib.crc32(bytes(data[body : body + key_len]), salt)).to_bytes(4, "little")
    record[24:28] = zlib.crc32(bytes(record[:24]), salt).to_bytes(4, "little")
    Path(path).write_bytes(bytes(data[:offset]) + bytes(record))
    caplog.set_level(logging.WARNING, logger="buntsession")
    reopened = TestClient(make_app(BuntStore(DB(path))), cookies=client.cookies)
    assert reopened.get("/get").json() == {}
    assert any("could not be decoded" in r.getMessage() for r in caplog.records)


def test_twenty_thousand_anonymous_and_unknown_token_requests_store_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "d.db")
    store = BuntStore(DB(path))
    app = make_app(store)

    async def main() -> int:
        await asgi_get(app, [], "/get")  # opens the store
        size = os.path.getsize(path)
        for i in range(20_000):
            headers = [] if i % 2 else [(b"cookie", b"session=" + secrets.token_urlsafe(32).encode())]
            status, response_headers = await asgi_get(app, headers, "/get" if i % 3 else "/none")
            assert status == 200 and not any(name == b"set-cookie" for name, _ in response_headers)
        assert len(store.db) == 0
        return os.path.getsize(path) - size

    assert anyio.run(main) == 0


def test_twenty_thousand_hostile_cookie_headers(tmp_path: Path) -> None:
    store = CountingStore()
    app = make_app(store, secret_key="fuzz")
    rng = random.Random(2026)
    token = secrets.token_urlsafe(32)
    shapes = [
        lambda: rng.randbytes(rng.randint(0, 200)),
        lambda: b"session=" + rng.randbytes(16 * 1024),
        lambda: b"session=" + b"\\" * 8192,
        lambda: b"; ".join(b"session=%d" % i for i in range(100)),
        lambda: b"session=\x00\r\nSet-Cookie: evil=1",
        lambda: b'session="' + token.encode() + b'"',
        lambda: b"session=" + token.encode() + b"." + secrets.token_urlsafe(32).encode(),  # forged signature
        lambda: b"session=" + token.encode(),  # unsigned where a signature is needed
        lambda: "session=ünïcödé".encode("latin-1"),
        lambda: b"session=" + rng.choice([b"", b"null", b"=", b";;;", b"\xff\xfe"]),
    ]

    async def main() -> None:
        for _ in range(20_000):
            cookie = rng.choice(shapes)()
            status, response_headers = await asgi_get(app, [(b"cookie", cookie)] * rng.randint(1, 2), "/get")
            assert status == 200
            for name, value in response_headers:
                assert name != b"set-cookie", value

    started = time.monotonic()
    anyio.run(main)
    assert store.lookups == 0  # nothing malformed or forged reached the store
    assert time.monotonic() - started < 120


def test_mass_expiry_does_not_stall_requests(tmp_path: Path) -> None:
    from helpers import FakeClock

    clock = FakeClock()
    db = DB(str(tmp_path / "d.db"), sync="never", cleanup_interval=0.05)
    db._clock = clock
    app = make_app(BuntStore(db), clock)

    async def main() -> tuple[float, int]:
        await asgi_get(app, [], "/get")
        value = b"v" * 100
        for i in range(200_000):
            await db.set(f"session:{i:064x}", value, expire_at=clock.now + 60 + (i % 1000) / 1000)
        batches = db._cleanup_batches
        clock.advance(62)
        worst = 0.0
        while len(db._data) > 0:
            started = time.perf_counter()
            status, _ = await asgi_get(app, [], "/none")
            assert status == 200
            worst = max(worst, time.perf_counter() - started)
            await anyio.sleep(0.01)
        return worst, db._cleanup_batches - batches

    worst, batches = anyio.run(main)
    assert batches >= 200_000 // 500  # bounded batches
    assert worst < 0.2, f"a probe request took {worst * 1000:.1f} ms"  # wide: the benchmark has the figure
