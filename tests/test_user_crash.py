"""A process SIGKILLed while it ends a user's sessions: the listing afterwards shows exactly the sessions
that are live and bound to the user, never a dead one, never hiding a live one."""

from __future__ import annotations

import random
import time
from pathlib import Path

import anyio
import pytest
from child_users import log_in
from test_crash import kill, wait_for_line

from buntsession import DB, BuntStore
from buntsession.codec import decode_meta
from buntsession.lifecycle import Lifecycle
from buntsession.users import BIND_GRACE, session_id

CHILD = str(Path(__file__).with_name("child_users.py"))
SESSIONS = 12


def start(path: str, mode: str) -> object:
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, CHILD, path, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


async def prepare(path: str) -> None:
    async with DB(path, sync="always") as db:
        life = Lifecycle(BuntStore(db), 3600)
        for _ in range(SESSIONS):
            await log_in(life, "alice")
        for _ in range(3):
            await log_in(life, "bob")


async def truth_and_listing(path: str, user: str, later: float = 0.0) -> tuple[set[str], set[str], int]:
    """The ids of the live sessions bound to `user` found by reading every record, the ids the listing
    shows (`later` seconds from now), and how many entries the user's index holds afterwards."""
    async with DB(path) as db:
        store = BuntStore(db)
        store._now = lambda: time.time() + later  # type: ignore[method-assign]
        truth = set()
        async for key in db.scan("session:"):
            rest = key[len("session:"):]
            if len(rest) != 64:
                continue  # an index or an import marker
            value = await db.get(key)
            assert value is not None
            if decode_meta(value).user == user:
                truth.add(session_id(rest))
        listed = {info.id for info in await store.user_sessions(user)}
        return truth, listed, len(await store._index_entries(user))


@pytest.mark.parametrize("stop", ["1", str(SESSIONS // 2), str(SESSIONS), "unbind"])
def test_sigkill_in_the_middle_of_ending_a_users_sessions(tmp_path: Path, stop: str) -> None:
    path = str(tmp_path / "s.db")
    anyio.run(prepare, path)
    child = start(path, f"pause:{stop}")
    lines = wait_for_line(child, "PAUSED ")  # type: ignore[arg-type]
    deleted = int(lines[-1].split()[1])
    kill(child)  # type: ignore[arg-type]
    truth, listed, _ = anyio.run(truth_and_listing, path, "alice")
    assert len(truth) == SESSIONS - deleted  # every acknowledged delete held, nothing else was lost
    assert listed == truth  # no dead session shown, no live one hidden
    truth_bob, listed_bob, _ = anyio.run(truth_and_listing, path, "bob")
    assert len(truth_bob) == 3 and listed_bob == truth_bob
    # Entries of dead sessions stay in the index (unseen) while they are young, since a login writes its
    # entry before its record; a listing after BIND_GRACE drops them.
    assert anyio.run(truth_and_listing, path, "alice")[2] == SESSIONS
    assert anyio.run(truth_and_listing, path, "alice", BIND_GRACE + 1) == (truth, truth, len(truth))


@pytest.mark.slow
def test_sigkill_at_random_moments_while_logging_in_and_ending(tmp_path: Path) -> None:
    rng = random.Random(11)
    rounds_done = 0
    for round_ in range(8):
        path = str(tmp_path / f"churn-{round_}.db")
        child = start(path, "churn")
        wait_for_line(child, "ACK 0")  # type: ignore[arg-type]
        time.sleep(rng.uniform(0.0, 0.3))
        lines = kill(child)  # type: ignore[arg-type]
        rounds_done += 1 + len(lines)
        truth, listed, _ = anyio.run(truth_and_listing, path, "alice")
        assert listed == truth
    assert rounds_done > 8
