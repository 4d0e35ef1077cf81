"""Real processes killed with SIGKILL: reopen always succeeds and holds every acknowledged operation."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from child_db import expected_state
from helpers import read_state

from buntsession.engine.log import REWRITE_SUFFIX

CHILD = str(Path(__file__).with_name("child_db.py"))


def start(path: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, CHILD, path, *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def kill(child: subprocess.Popen[str]) -> list[str]:
    """SIGKILL the child; return the lines it printed that were not read yet."""
    assert child.stdout is not None and child.stderr is not None and child.stdin is not None
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    out, err = child.stdout.read(), child.stderr.read()  # the pipes' buffers, then EOF
    for stream in (child.stdin, child.stdout, child.stderr):
        stream.close()
    assert "Traceback" not in err, err
    return [line for line in out.splitlines() if line]


def wait_for_line(child: subprocess.Popen[str], prefix: str, timeout: float = 30.0) -> list[str]:
    """Lines read until one starts with `prefix` (included)."""
    assert child.stdout is not None
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if line.startswith(prefix):
            return lines
    stderr = child.stderr.read() if child.stderr else ""
    raise AssertionError(f"child never printed {prefix!r}; got {lines[-3:]}, stderr: {stderr}")


def acked(lines: list[str]) -> int:
    numbers = [int(line.split()[1]) for line in lines if line.startswith("ACK ")]
    assert numbers == list(range(len(numbers))), "acknowledgements out of order"
    return len(numbers)


def assert_prefix_state(path: str, acknowledged: int) -> None:
    """The file holds ops 0..acknowledged-1, and at most the one op in flight when the child died."""
    state = read_state(path)
    assert state in (expected_state(acknowledged), expected_state(acknowledged + 1)), (
        f"state after {acknowledged} acknowledged operations is neither the acknowledged prefix nor one more"
    )


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "rounds"), [("write", 36), ("shrinkwrite", 24)])
def test_sigkill_at_random_moments_loses_nothing_acknowledged(tmp_path: Path, mode: str, rounds: int) -> None:
    rng = random.Random(2026)
    total_acked = 0
    for round_ in range(rounds):
        path = str(tmp_path / f"{mode}-{round_}.db")
        child = start(path, mode, rng.choice(["everysec", "always", "never"]))
        wait_for_line(child, "ACK 0")
        time.sleep(rng.uniform(0.0, 0.4))
        lines = ["ACK 0", *kill(child)]
        count = acked(lines)
        total_acked += count
        assert_prefix_state(path, count)
        assert not os.path.exists(path + REWRITE_SUFFIX)  # the reopen removed any leftover
    assert total_acked > rounds * 10  # the children really did work before they died


@pytest.mark.parametrize("phase", ["snapshot", "tail", "fsync", "rename", "dirsync"])
def test_sigkill_in_each_phase_of_a_shrink_leaves_the_whole_old_or_new_file(tmp_path: Path, phase: str) -> None:
    path = str(tmp_path / "d.db")
    child = start(path, f"phase:{phase}")
    lines = wait_for_line(child, "SIZE ")
    size_before = int(lines[-1].split()[1])
    lines += wait_for_line(child, "PHASE ")
    time.sleep(0.2)  # writers go on while the shrink is paused (or wait for the lock in the last phases)
    lines += kill(child)
    renamed = phase in ("rename", "dirsync")
    assert os.path.exists(path + REWRITE_SUFFIX) is not renamed
    if renamed:
        assert os.path.getsize(path) < size_before  # the new, shrunk file
    else:
        assert os.path.getsize(path) >= size_before  # the old file, still growing
    assert_prefix_state(path, acked(lines))
    assert not os.path.exists(path + REWRITE_SUFFIX)
