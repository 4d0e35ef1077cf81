"""The operator tools, run as a user runs them: `python -m buntsession` and the `buntsession` script."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from helpers import read_state, record_offsets
from test_crash import kill, start, wait_for_line

from buntsession import DB


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "buntsession", *args], capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.fixture
def good(tmp_path: Path) -> str:
    path = str(tmp_path / "good.db")

    async def fill() -> None:
        async with DB(path) as db:
            for i in range(30):
                await db.set(f"k{i}", f"value {i}".encode(), ttl=3600 if i % 3 else None)
            await db.set("gone", b"x", ttl=0.01)
            await db.delete("k1")
            await anyio.sleep(0.02)

    anyio.run(fill)
    return path


def test_check_clean_torn_and_damaged(good: str, tmp_path: Path) -> None:
    done = run("check", good)
    assert done.returncode == 0, done
    assert "32 records, 29 live keys, 1 expired keys, 0 torn-tail bytes" in done.stdout and "clean" in done.stdout

    torn = str(tmp_path / "torn.db")
    shutil.copy(good, torn)
    with open(torn, "ab") as f:
        f.write(b"\x00" * 7)
    done = run("check", torn)
    assert done.returncode == 1 and "7 torn-tail bytes" in done.stdout

    damaged = str(tmp_path / "damaged.db")
    data = bytearray(Path(good).read_bytes())
    offset = record_offsets(bytes(data))[5]
    data[offset + 30] ^= 0xFF
    Path(damaged).write_bytes(bytes(data))
    done = run("check", damaged)
    assert done.returncode == 2 and f"first damage at byte offset {offset}" in done.stdout
    assert Path(damaged).read_bytes() == bytes(data)  # read-only

    Path(damaged).write_bytes(b"SQLite format 3\x00" + bytes(100))
    assert run("check", damaged).returncode == 2


def test_stats_and_dump(good: str) -> None:
    done = run("stats", "--json", good)
    assert done.returncode == 0
    report = json.loads(done.stdout)
    assert (report["keys"], report["expired"], report["no_expiry"]) == (29, 1, 10)
    assert 3500 < report["expires_in"]["min"] <= report["expires_in"]["max"] <= 3600
    assert "29 live" in run("stats", good).stdout

    lines = [json.loads(line) for line in run("dump", good).stdout.splitlines()]
    assert {line["key"]: base64.b64decode(line["value"]) for line in lines} == read_state(good)
    assert all((line["expire_at"] is None) == (int(line["key"][1:]) % 3 == 0) for line in lines)


def test_repair_keeps_every_valid_record_ends_suspect_keys_and_keeps_the_original(good: str, tmp_path: Path) -> None:
    original = Path(good).read_bytes()
    offsets = record_offsets(original)
    data = bytearray(original)
    data[offsets[3] + 2] ^= 0x55  # damage one record in the middle
    Path(good).write_bytes(bytes(data) + b"torn")
    done = run("repair", good)
    assert done.returncode == 0, done
    (aside,) = [p for p in os.listdir(tmp_path) if p.startswith("good.db.corrupt-")]
    assert (tmp_path / aside).read_bytes() == bytes(data) + b"torn"  # nothing it could not read is lost
    assert run("check", good).returncode == 0
    repaired = Path(good).read_bytes()
    # Every record but the damaged one, and a DEL for each key whose last record comes before the damage
    # (k0 and k2: a later record of theirs may have been in the damaged bytes; k1's DEL comes after it).
    assert len(record_offsets(repaired)) == len(offsets) - 1 + 2
    assert "ended 2 keys" in done.stdout
    state = read_state(good)
    assert len(state) == 29 - 1 - 2 and not {"k0", "k2", "k3"} & state.keys()  # the damaged one was k3's set
    assert run("repair", good).stdout.endswith("clean, nothing to repair\n")


def test_shrink_command(good: str) -> None:
    async def churn() -> None:
        async with DB(good, autoshrink=False) as db:
            for _ in range(500):
                await db.set("churn", os.urandom(100))

    anyio.run(churn)
    before = os.path.getsize(good)
    state = read_state(good)
    done = run("shrink", good)
    assert done.returncode == 0, done
    assert os.path.getsize(good) < before / 3
    assert read_state(good) == state


def test_repair_and_shrink_refuse_a_held_file_and_reads_work_on_it(good: str) -> None:
    holder = start(good, "hold")
    wait_for_line(holder, "OPEN")
    try:
        before = Path(good).read_bytes()
        for command in ("repair", "shrink"):
            done = run(command, good)
            assert done.returncode == 75 and "held by a running process" in done.stderr
        assert Path(good).read_bytes() == before
        assert run("check", good).returncode == 0
        assert run("stats", good).returncode == 0
        assert run("dump", good).returncode == 0
    finally:
        kill(holder)


def test_usage_and_missing_files(tmp_path: Path) -> None:
    assert run().returncode == 64
    assert run("explode", "x").returncode == 64
    assert run("check").returncode == 64
    for command in ("check", "stats", "dump", "repair", "shrink"):
        done = run(command, str(tmp_path / "missing.db"))
        assert done.returncode == 66, (command, done)
        assert not (tmp_path / "missing.db").exists()


def test_console_script_is_installed(good: str) -> None:
    script = Path(sys.executable).with_name("buntsession")
    done = subprocess.run([str(script), "check", good], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "clean" in done.stdout


def test_progress_shows_on_a_terminal_only() -> None:
    import io

    from buntsession.tools import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    shown, piped = Terminal(), io.StringIO()
    for stream in (shown, piped):
        progress = Progress("checking", 100 * 1024 * 1024, stream)
        for done in range(0, 100 * 1024 * 1024, 1024 * 1024):
            progress.update(done)
        progress.finish()
    assert "checking: 50%" in shown.getvalue()
    assert piped.getvalue() == ""
